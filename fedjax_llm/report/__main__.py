import sys

from fedjax_llm.report.cli import main

sys.exit(main())
