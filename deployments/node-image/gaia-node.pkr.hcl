# A Spark node image for gaia-flows clusters: Ubuntu 24.04 + deployments/node-image/install-stack.sh.
# Build (from the repository root, after `uv build --wheel -o dist/`):
#   packer init deployments/node-image && packer build -var-file=<cloud>.pkrvars.hcl deployments/node-image
# then put the image's name (OpenStack) or id (AWS) in the profile's cloud.image.
packer {
  required_plugins {
    openstack = { source = "github.com/hashicorp/openstack", version = ">= 1.1.0" }
    amazon    = { source = "github.com/hashicorp/amazon", version = ">= 1.3.0" }
  }
}

variable "version" { type = string }              # gaia-flows version, part of the image name
variable "openstack_source_image" { type = string, default = "ubuntu-24.04" }
variable "openstack_flavor" { type = string, default = "general.v1.small" }
variable "openstack_network" { type = string, default = "gaia-net" }
variable "aws_region" { type = string, default = "eu-west-2" }
variable "aws_source_ami" { type = string, default = "ami-0b9932f4918a00c4f" } # Ubuntu 24.04 eu-west-2

source "openstack" "node" {
  image_name   = "gaia-flows-node-${var.version}"
  source_image_name = var.openstack_source_image
  flavor       = var.openstack_flavor
  networks     = [var.openstack_network]
  ssh_username = "ubuntu"
}

source "amazon-ebs" "node" {
  ami_name      = "gaia-flows-node-${var.version}"
  region        = var.aws_region
  source_ami    = var.aws_source_ami
  instance_type = "m5.large"
  ssh_username  = "ubuntu"
}

build {
  sources = ["source.openstack.node", "source.amazon-ebs.node"]

  provisioner "shell" { inline = ["mkdir -p /tmp/gaia-flows"] }
  provisioner "file" {
    sources     = ["constraints.txt", "dist/gaia_flows-${var.version}-py3-none-any.whl"]
    destination = "/tmp/gaia-flows/"
  }
  provisioner "shell" {
    execute_command = "sudo bash '{{ .Path }}' /tmp/gaia-flows"
    script          = "deployments/node-image/install-stack.sh"
  }
}
