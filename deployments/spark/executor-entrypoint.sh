#!/bin/bash
# Start a Spark executor the way Spark's own image does (kubernetes/dockerfiles/spark/
# entrypoint.sh, `executor` branch), using the JVM jars that ship inside the pip pyspark.
# Spark passes the executor's identity and JVM options as SPARK_* environment variables.
set -euo pipefail
if [ "${1:-}" != executor ]; then
  exec "$@"
fi
SPARK_JARS="$(python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
mapfile -t JAVA_OPTS < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//')
exec "${JAVA_HOME:-/usr/lib/jvm/java-17}/bin/java" "${JAVA_OPTS[@]}" \
  -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
  -cp "${SPARK_JARS}/*" \
  org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
  --driver-url "${SPARK_DRIVER_URL}" \
  --executor-id "${SPARK_EXECUTOR_ID}" \
  --cores "${SPARK_EXECUTOR_CORES}" \
  --app-id "${SPARK_APPLICATION_ID}" \
  --hostname "${SPARK_EXECUTOR_POD_IP}" \
  --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
  --podName "${SPARK_EXECUTOR_POD_NAME}"
