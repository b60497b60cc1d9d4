#!/usr/bin/env bash
# Build the image and save it as the archive the organisers ask for:
#   docs/container/export.sh [gpu|cpu] [ARCHIVE]   (default jaxreg-lumir25-VARIANT.tar.gz)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
variant=${1:-gpu}
archive=${2:-jaxreg-lumir25-$variant.tar.gz}
bash "$here/build.sh" "$variant" "jaxreg-lumir25:$variant"
${ENGINE:-docker} save "jaxreg-lumir25:$variant" | gzip -c > "$archive"
echo "saved jaxreg-lumir25:$variant to $archive"
