"""`python -m vpt_fast.bench <request as JSON>`: the resident activation memory probe that
`vpt_fast.bench.activation_memory` runs in a fresh process; prints its result as one JSON line."""
import json
import sys

from vpt_fast.bench.core import BenchConfig, probe_activation_memory

request = json.loads(sys.argv[1])
result = probe_activation_memory(BenchConfig(**request["cfg"]), request["backend"], request["recompute"])
print(json.dumps(result))
