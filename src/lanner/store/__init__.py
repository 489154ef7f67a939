"""Lanner's log: one SQLite database with numbered migrations.

    from lanner.store import Store, Turn
    with Store(paths.db_path(paths.home())) as store:
        cid = store.new_conversation("smollm2")
        store.log(Turn(conversation_id=cid, ...))

See ``lanner.store.db`` for the contracts.
"""

from lanner.store.db import Store
from lanner.store.turn import Turn, new_conversation_id, utc_now

__all__ = ["Store", "Turn", "new_conversation_id", "utc_now"]
