"""Several gateway nodes on one PostgreSQL: heartbeats (``nodes``), which node holds each file
(``instances.node_name``), and fetching an instance's bytes from the node that holds it
(``peers``, served by ``internal``)."""
