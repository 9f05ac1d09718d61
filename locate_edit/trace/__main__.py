"""python -m locate_edit.trace"""

from locate_edit.trace.cli import USAGE, main
from mend.cli import run

run(main, USAGE)
