#!/bin/sh
# A program that is not Python (--no-python): rank 1 writes torchelastic's error file and fails.
echo "shell rank $RANK of $WORLD_SIZE"
if [ "$RANK" = "1" ]; then
  printf '{"message": {"message": "RuntimeError: the shell gave up", "extraInfo": {"py_callstack": "Traceback: in the shell", "timestamp": "%s"}}}' "$(date +%s)" > "$TORCHELASTIC_ERROR_FILE"
  exit 3
fi
sleep 30
