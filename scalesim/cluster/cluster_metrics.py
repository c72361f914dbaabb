"""`/metrics` at the ingress: the routing counters, and every replica's series labelled by replica.

Each replica's text is parsed with prometheus_client's parser and re-emitted with a
`replica="<rank>"` label, one family per metric name across replicas (as the exposition format
requires), so counters stay counters and a scraper sees one consistent page.
"""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from scalesim.cluster.router import RoutingView, shared_view


class RoutingCollector(Collector):
    """The router's counters, read from this process's RoutingView at scrape time."""

    def collect(self):
        view: RoutingView = shared_view()
        requests = CounterMetricFamily("scalesim_routed_requests", "requests sent to each engine replica",
                                       labels=["replica"])
        for rank, count in sorted(dict(view.requests_by_rank).items()):  # a copy: the router thread adds keys
            requests.add_metric([str(rank)], count)
        yield requests
        yield CounterMetricFamily("scalesim_routing_spills", "cold agents sent past an overloaded owner",
                                  value=view.spills)
        yield CounterMetricFamily("scalesim_routing_fallbacks", "agent requests sent on because the owner had died",
                                  value=view.fallbacks)
        yield CounterMetricFamily("scalesim_misrouted_hints", "hinted agents whose owner had died when hinted",
                                  value=view.misrouted_hints)
        yield CounterMetricFamily("scalesim_routing_moves", "agents whose state a planned move took elsewhere",
                                  value=view.moves)
        yield CounterMetricFamily("scalesim_routing_moved_bytes", "bytes of KV files stored by planned moves",
                                  value=view.moved_nbytes)
        yield CounterMetricFamily("scalesim_routing_adopted_bytes",
                                  "bytes of KV taken in from removed replicas' state folders",
                                  value=view.adopted_nbytes)
        yield GaugeMetricFamily("scalesim_live_replicas", "engine replicas the router can reach",
                                value=len(view.live_ranks))


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families


def merge_replica_metrics(pages: dict[int, str]) -> bytes:
    """Prometheus text of several replicas' pages, each sample labelled with its replica's rank."""
    merged: dict[str, Metric] = {}
    for rank, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                into.add_sample(sample.name, {"replica": str(rank), **sample.labels}, sample.value)
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
