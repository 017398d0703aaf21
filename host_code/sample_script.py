# An example submission. Send it with:
#   python3 -c 'import json,sys; print(json.dumps({"code": open(sys.argv[1]).read()}))' \
#     host_code/sample_script.py | curl -s -X POST http://127.0.0.1:8000/submit_code \
#     -H 'Content-Type: application/json' -d @-
import platform
import sys

numbers = [n * n for n in range(10)]
print("Hello from the sandbox!")
print("squares:", numbers)
print("python", platform.python_version(), file=sys.stderr)
