import sys

if sys.argv[1:2] == ["serving"]:  # python -m benchmarks serving: many tasks from one base model (benchmarks/serving.py)
    from benchmarks.serving import main

    sys.exit(main(sys.argv[2:]))

from benchmarks.run import main

sys.exit(main())
