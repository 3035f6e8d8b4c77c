"""Metrics (issue 15): the per-export request statistics the NBD layer keeps as plain
integers (qnbd/nbd/stats.py), exposed as Prometheus metrics and as JSON (the control
socket's `metrics`).

prometheus_client is the Prometheus project's own Python library: it owns the text
exposition format (escaping of label values, `_total`/`_bucket` naming, HELP/TYPE lines,
OpenMetrics negotiation), which a hand-written formatter would have to get right and keep
right. It is used only at scrape time, through a custom Collector that reads our counters:
no prometheus_client object is touched per request, so the hot path stays two clock reads
and a few integer increments.
"""

from prometheus_client.core import (CollectorRegistry, CounterMetricFamily,
                                    GaugeMetricFamily, HistogramMetricFamily)
from prometheus_client.exposition import generate_latest

from ..block.cache import caches_behind
from ..nbd.stats import COMMANDS, ERRORS


def table_caches(export) -> dict[str, dict[str, int]]:
    """The hits and misses of the metadata caches an export's requests go through, by
    cache ("l2", "refcount", "qed-l2"), summed down the backing chain. A checkpoint's
    view has none of its own: its reads are counted by the live export's caches."""
    out: dict[str, dict[str, int]] = {}
    for cache in caches_behind(export.device):
        counts = out.setdefault(cache.name, {"hits": 0, "misses": 0})
        counts["hits"] += cache.hits
        counts["misses"] += cache.misses
    return out


def snapshot(server) -> dict:
    """Everything as JSON: per export, its clients, its request statistics and its table
    caches."""
    catalog = server.catalog
    out = {}
    for export in catalog.exports:
        stats = catalog.stats.get(export.name)
        entry = stats.snapshot() if stats is not None else {}
        entry["clients"] = export.clients
        entry["table_caches"] = table_caches(export)
        out[export.name] = entry
    return {"exports": out, "connections": len(server.active), "buffers": buffers(server)}


def buffers(server) -> dict[str, int]:
    """The payload buffer pool's counts (qnbd/nbd/buffers.py): buffers handed out,
    of which reused, and the bytes it keeps."""
    pool = server.buffers
    return {"taken": pool.taken, "reused": pool.reused, "kept_bytes": pool.kept}


class ServerCollector:
    """A prometheus_client Collector reading the server's statistics when scraped."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        catalog = self.server.catalog
        requests = CounterMetricFamily("qnbd_requests", "NBD requests answered, by command",
                                       labels=["export", "command"])
        nbytes = CounterMetricFamily("qnbd_request_bytes", "Bytes covered by NBD requests "
                                     "(read, written, zeroed, trimmed, queried), by command",
                                     labels=["export", "command"])
        latency = HistogramMetricFamily("qnbd_request_duration_seconds", "Time to answer "
                                        "an NBD request (until its reply is ready, a "
                                        "pooled read's disk wait included), by command",
                                        labels=["export", "command"])
        errors = CounterMetricFamily("qnbd_errors", "NBD error replies, by error",
                                     labels=["export", "errno"])
        clients = GaugeMetricFamily("qnbd_clients", "Clients in transmission, by export",
                                    labels=["export"])
        cbw = CounterMetricFamily("qnbd_copy_before_write_bytes", "Bytes copied into "
                                  "checkpoint overlays before a write changed them",
                                  labels=["export"])
        hits = CounterMetricFamily("qnbd_table_cache_hits", "Metadata table lookups "
                                   "answered by the cache, by cache (l2, refcount, qed-l2)",
                                   labels=["export", "cache"])
        misses = CounterMetricFamily("qnbd_table_cache_misses", "Metadata tables read from "
                                     "the image into the cache, by cache",
                                     labels=["export", "cache"])
        connections = GaugeMetricFamily("qnbd_connections", "NBD connections, in the "
                                        "handshake or in transmission")
        connections.add_metric([], len(self.server.active))
        pool = buffers(self.server)
        taken = CounterMetricFamily("qnbd_payload_buffers_taken", "Large READ reply and "
                                    "WRITE payload buffers handed out")
        taken.add_metric([], pool["taken"])
        reused = CounterMetricFamily("qnbd_payload_buffers_reused", "Of those, buffers "
                                     "an earlier request was done with")
        reused.add_metric([], pool["reused"])
        kept = GaugeMetricFamily("qnbd_payload_buffer_bytes", "Bytes of payload buffers "
                                 "the server keeps for reuse (in use or free)")
        kept.add_metric([], pool["kept_bytes"])
        for export in catalog.exports:
            name = export.name
            clients.add_metric([name], export.clients)
            for cache, counts in table_caches(export).items():
                hits.add_metric([name, cache], counts["hits"])
                misses.add_metric([name, cache], counts["misses"])
            stats = catalog.stats.get(name)
            if stats is None:
                continue
            cbw.add_metric([name], stats.copy_before_write_bytes)
            for err, count in sorted(stats.errors.items()):
                errors.add_metric([name, ERRORS.get(err, str(err))], count)
            for i, command in enumerate(COMMANDS):
                count, buckets = stats.histogram(i)
                if not count:
                    continue
                requests.add_metric([name, command], count)
                nbytes.add_metric([name, command], stats.bytes[i])
                latency.add_metric([name, command],
                                   [("+Inf" if le == float("inf") else repr(le), n)
                                    for le, n in buckets], stats.latency_ns[i] / 1e9)
        yield from (requests, nbytes, latency, errors, clients, connections, cbw, hits,
                    misses, taken, reused, kept)


def prometheus_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def registry_for(server) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    return registry
