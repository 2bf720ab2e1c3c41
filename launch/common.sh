# Shared by the launch scripts: `run` executes a command, or prints it when DRY_RUN=1 (to check what would run).
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

usage_error() {
  echo "$1" >&2
  exit 2
}
