"""Child process for test_crash: bulk-adds items, printing each id after its add() returns."""

import sys

from memstack import Memory

path, start = sys.argv[1], int(sys.argv[2])
memory = Memory(path)
for n in range(start, start + 10_000):
    result = memory.add([{"role": "user", "content": f"bulk memory {n} about topic {n % 97}"},
                         {"role": "assistant", "content": f"noted {n}"}],
                        user_id=f"user{n % 3}", session_id=f"s{n // 10}")
    print(" ".join(result.ids), flush=True)
