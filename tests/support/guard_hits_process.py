"""A separate API replica recording guard hits against the shared database and Redis (for the auto-trip test).

Usage: python -m tests.support.guard_hits_process DATABASE_URL REDIS_URL DEPARTMENT COUNT LIMIT
Prints one JSON line: the departments each hit tripped.
"""

from __future__ import annotations

import json
import sys

from core.db import unit_of_work
from core.settings import Settings
from guard import controls


def main(database_url: str, redis_url: str, department: str, count: int, limit: int) -> None:
    settings = Settings(database_url=database_url, broker_url=redis_url, guard_auto_trip_per_minute=limit)
    trips = []
    for _ in range(count):
        with unit_of_work(database_url) as session:
            trips.append(controls.record_guard_hit(session=session, settings=settings, departments=[department],
                                                   kind="firewall"))
    print(json.dumps({"trips": trips}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
