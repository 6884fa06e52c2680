#!/usr/bin/env bash
# Air-gapped clusters: export a ref's bundle online, carry one file across, import it into a
# store the cluster can reach (here a folder on its shared filesystem), and start jobs from it.
#
#   BUNDLER_REMOTE=s3://my-bucket/compile-caches REF=ci/main MIRROR=/shared/bundler-mirror \
#       bash examples/airgap.sh
#
# tests/test_examples.py runs this script against a local S3 server (moto).
set -euo pipefail
: "${REF:?set REF to the ref to carry, e.g. ci/main}"
: "${MIRROR:?set MIRROR to a folder the cluster can read, e.g. /shared/bundler-mirror}"
FILE="${FILE:-offline.tar.zst}"

# 1. Online side (needs BUNDLER_REMOTE): save the bundle, verified on the way, to one file.
bundler export --ref "$REF" -o "$FILE"
bundler verify "$FILE"

# 2. Carry $FILE across the air gap (removable disk, one-way transfer).

# 3. Cluster side: verify again and import into the cluster's own store, under the same ref.
bundler import "$FILE" --ref "$REF" --remote "file://$MIRROR"
bundler ls --remote "file://$MIRROR"

# 4. Jobs on the cluster start warm from the mirror: the same two settings as everywhere else.
#    (examples/demo_job.py stands in for the training script.)
BUNDLER_REMOTE="file://$MIRROR" BUNDLER_REF="$REF" python examples/demo_job.py --quick
