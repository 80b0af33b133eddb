"""Cluster mode: one plain server to the client, many shards behind it.

* :mod:`.slots` key slots (CRC16, hash tags);
* :mod:`.resp` the values the engine reads whole (commands, replies it merges);
* :mod:`.keyspecs` the command table learned from the server (``COMMAND``), which gives
  the key positions of any command;
* :mod:`.topology` shards and slot owners from ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` on
  older engines);
* :mod:`.link` one connection to one shard primary;
* :mod:`.session` the engine's core: the reader, the writer in the client's order, the
  session's connections;
* :mod:`.routing` planning one command (hooks, keys, slot, split per slot);
* :mod:`.entries` a command's place in the reply order and the requests it sent;
* :mod:`.redirects` following ``MOVED`` / ``ASK`` / ``TRYAGAIN`` / ``CLUSTERDOWN``;
* :mod:`.commands` whole-cluster and connection commands; :mod:`.merge` their answers;
* :mod:`.transactions` ``MULTI`` / ``EXEC`` / ``WATCH`` on one shard;
* :mod:`.pubsub` (sharded) pub/sub; :mod:`.auth` the client's ``AUTH`` and ``HELLO``.
"""
