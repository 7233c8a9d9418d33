import sys

from .cli import main
from .distributed import exit_process

status = main()
exit_process(status)
sys.exit(status)
