"""``python -m megatron_apbv`` with the test-only fault hook installed (``APBV_FAULT_INJECT``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fault_injection import install_fault_hook  # noqa: E402

from megatron_apbv.cli import main  # noqa: E402

if __name__ == "__main__":
    install_fault_hook()
    sys.exit(main())
