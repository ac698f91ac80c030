#!/usr/bin/env bash
# Offline lint of the deployment artifacts (`make check-deploy`, part of `make test`):
#   hadolint on the Dockerfile: every rule, style included, fails the run;
#   checkov on the Dockerfile and eventarc.tf: any failed check fails the run. A skip must be an
#   inline `#checkov:skip=CKV_X:reason` beside the resource, so the reason is reviewed with it;
#   terraform fmt -check on eventarc.tf when terraform is installed.
# The structure tests (tests/deploy/) run with pytest.
#
# checkov pins many dependencies of its own, so it lives in its own virtualenv (.venv-checkov/,
# git-ignored), created on first use and re-created when CHECKOV_VERSION changes.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
PYTHON=${PYTHON:-python3}
HADOLINT=${HADOLINT:-.venv/bin/hadolint}
CHECKOV_VENV=.venv-checkov
checkov=$CHECKOV_VENV/bin/checkov

if [[ ! -x $checkov ]] || [[ $("$checkov" --version 2>/dev/null) != "$CHECKOV_VERSION" ]]; then
  echo "check-deploy: installing checkov $CHECKOV_VERSION into $CHECKOV_VENV"
  rm -rf "$CHECKOV_VENV"
  "$PYTHON" -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

echo "check-deploy: hadolint $("$HADOLINT" --version | sed 's/.* //') Dockerfile"
"$HADOLINT" --failure-threshold style Dockerfile

echo "check-deploy: checkov $CHECKOV_VERSION Dockerfile eventarc.tf"
# --skip-download: no Prisma Cloud account, and no network beyond the package registries.
"$checkov" --quiet --compact --skip-download --framework dockerfile terraform \
  --file Dockerfile --file eventarc.tf

# Terraform's own formatter, when a terraform binary is installed (it needs no provider and no
# network); `terraform validate` would need the provider from the registry, so it is not run here.
if command -v terraform >/dev/null; then
  echo "check-deploy: terraform fmt -check eventarc.tf"
  terraform fmt -check -diff eventarc.tf
else
  echo "check-deploy: terraform not installed, terraform fmt skipped"
fi

echo "check-deploy: ok"
