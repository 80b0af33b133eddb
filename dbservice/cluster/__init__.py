"""Cluster mode: one plain server to the client, many shards behind it.

* :mod:`.slots` key slots (CRC16, hash tags);
* :mod:`.resp` the values the engine reads whole (commands, replies it merges);
* :mod:`.keyspecs` the command table learned from the server (``COMMAND``), which gives
  the key positions of any command;
* :mod:`.topology` shards and slot owners from ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` on
  older engines);
* :mod:`.link` one connection to one shard primary;
* :mod:`.session` the engine: routes each command, merges whole-cluster answers, keeps
  the client's order.
"""
