#!/bin/bash
# The node image's contract (deployments/cloud-init/spark-node.yaml.tmpl, install part):
# Java 17, Debian's prometheus-node-exporter, Python 3.11 and the driver's exact stack - gaia-flows and every dependency pinned
# by constraints.txt - in /opt/gaia-flows/venv, so a node boots without the internet and its
# executors run the same pyspark, pyarrow, numpy, pandas and scikit-learn as the driver.
# Run as root on the image builder with the project's wheel and constraints.txt in $1.
set -euo pipefail
src=${1:?usage: install-stack.sh <dir with gaia_flows-*.whl and constraints.txt>}
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless prometheus-node-exporter python3.11 python3.11-venv ca-certificates nfs-common ceph-common
python3.11 -m venv /opt/gaia-flows/venv
/opt/gaia-flows/venv/bin/pip install --no-cache-dir --constraint "$src/constraints.txt" "$src"/gaia_flows-*.whl
install -d -m 0755 /opt/gaia-flows/etc /opt/gaia-flows/bin /opt/gaia-flows/work
# What the driver checks at cluster start; recorded here for a person comparing images.
/opt/gaia-flows/venv/bin/python - <<'PY' > /opt/gaia-flows/etc/stack.txt
import sys, importlib.metadata as m
print(f"python {sys.version_info.major}.{sys.version_info.minor}")
for name in ("pyspark", "pyarrow", "numpy", "pandas", "scikit-learn", "gaia-flows"):
    print(name, m.version(name))
PY
apt-get clean
