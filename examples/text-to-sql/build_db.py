"""Build the bookshop database, shop.sqlite, from schema.sql and seed.sql.

    python examples/text-to-sql/build_db.py [OUTPUT]

The data files live in src/lanner/evals/tasks/text_to_sql/ (linked from this
folder), so that the installed `sql` eval task has them too; `lanner eval`
builds its own copy on first use, so this script is only for looking at the
database yourself or for fine-tuning scripts that want a file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lanner.evals.sqlexec import build_database

DATA = Path(__file__).resolve().parents[2] / "src" / "lanner" / "evals" / "tasks" / "text_to_sql"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path,
                        default=Path(__file__).with_name("shop.sqlite"),
                        help="where to write the database (default: %(default)s)")
    args = parser.parse_args()
    args.output.unlink(missing_ok=True)
    build_database(DATA / "schema.sql", DATA / "seed.sql", args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
