import sys

from megatron_apbv.cli import main

sys.exit(main())
