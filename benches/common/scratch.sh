# Sourced by the bench scripts: a scratch directory in $DIR, and every
# process the script started in the background ends with it, also on
# failure, and the directory with them.
DIR=$(mktemp -d)
cleanup() {
  local jobs
  jobs=$(jobs -p)
  [ -z "$jobs" ] || kill $jobs 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
