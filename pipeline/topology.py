"""The pipeline's graph, derived from what each stage declares it reads and writes.

Stages are nodes; stage A feeds stage B when one of A's outputs is one of B's
inputs. Nothing names a stage: order (topological, declaration order among equals),
upstream and downstream sets, entry stages (reading only topics no stage writes),
sinks (stages with no output), separate pipelines in one config (connected
components) and where a backfill lane's outputs go all follow from the graph.

Refused when settings are loaded (:meth:`Topology.build` raises ValueError): a
cycle, and a topic read by some stages with a backfill lane and by others
without (a lane batch's outputs would reach the lane-less readers twice or not at
all). Reported by :meth:`Topology.problems` (``pipeline topology --check``): an
input no stage writes that is not marked ``external: true``, and a stateful
stage whose inputs, lane and state topic differ in partition count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Topology:
    order: tuple[str, ...]
    inputs: Mapping[str, tuple[str, ...]]
    outputs: Mapping[str, tuple[str, ...]]
    lanes: Mapping[str, str | None]
    lookups: Mapping[str, tuple[str, ...]]
    producers: Mapping[str, tuple[str, ...]]
    consumers: Mapping[str, tuple[str, ...]]
    downstream_of: Mapping[str, tuple[str, ...]]
    upstream_of: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(cls, stages: Mapping[str, Any]) -> Topology:
        """The graph of ``stages`` (id -> spec with inputs, all_outputs, backfill_lane,
        lookups); ValueError for a cycle or inconsistent backfill lanes."""
        ids = list(stages)
        inputs = {s: tuple(stages[s].inputs) for s in ids}
        outputs = {s: tuple(stages[s].all_outputs) for s in ids}
        lanes = {s: stages[s].backfill_lane for s in ids}
        lookups = {s: tuple(stages[s].lookups.values()) for s in ids}
        producers: dict[str, list[str]] = {}
        consumers: dict[str, list[str]] = {}
        for s in ids:
            for t in outputs[s]:
                producers.setdefault(t, []).append(s)
            for t in inputs[s]:
                consumers.setdefault(t, []).append(s)
        down = {s: [b for b in ids if any(t in inputs[b] for t in outputs[s])] for s in ids}
        up = {s: [a for a in ids if s in down[a]] for s in ids}
        looped = [s for s in ids if s in down[s]]
        if looped:
            raise ValueError(f"stage {looped[0]!r} reads a topic it writes (a cycle)")
        order = _topological(ids, down, up)
        for topic, readers in consumers.items():
            with_lane = [r for r in readers if lanes[r]]
            if with_lane and len(with_lane) != len(readers):
                without = [r for r in readers if not lanes[r]]
                raise ValueError(
                    f"topic {topic!r} is read by {with_lane} with a backfill_lane and by "
                    f"{without} without one; give every reader of it a backfill_lane, or none"
                )
        rank = {s: i for i, s in enumerate(order)}

        def closure(start: str, edges: Mapping[str, list[str]]) -> tuple[str, ...]:
            seen = {start}
            todo = [start]
            while todo:
                for nxt in edges[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            return tuple(sorted(seen, key=rank.__getitem__))

        return cls(
            order=order,
            inputs=inputs,
            outputs=outputs,
            lanes=lanes,
            lookups=lookups,
            producers={t: tuple(v) for t, v in producers.items()},
            consumers={t: tuple(v) for t, v in consumers.items()},
            downstream_of={s: closure(s, down) for s in ids},
            upstream_of={s: closure(s, up) for s in ids},
        )

    # -- questions the rest of the project asks -----------------------------------------
    def upstream(self, stage_id: str) -> tuple[str, ...]:
        """``stage_id`` and every stage that feeds it, directly or not, in order."""
        return self.upstream_of[stage_id]

    def downstream(self, stage_id: str) -> tuple[str, ...]:
        """``stage_id`` and every stage it feeds, directly or not, in order."""
        return self.downstream_of[stage_id]

    def next_stages(self, stage_id: str) -> tuple[str, ...]:
        outs = set(self.outputs[stage_id])
        return tuple(s for s in self.order if outs & set(self.inputs[s]))

    def entry_stages(self) -> tuple[str, ...]:
        """Stages that read only topics no stage writes: where records enter."""
        return tuple(s for s in self.order if not any(t in self.producers for t in self.inputs[s]))

    def sinks(self) -> tuple[str, ...]:
        """Stages with no output topic (their effect is outside Kafka)."""
        return tuple(s for s in self.order if not self.outputs[s])

    def final_topics(self) -> tuple[str, ...]:
        """Topics stages write and no stage reads: the pipeline's results."""
        return tuple(
            dict.fromkeys(t for s in self.order for t in self.outputs[s] if t not in self.consumers)
        )

    def lane_targets(self, stage_id: str) -> dict[str, tuple[str, ...]]:
        """Per output topic of ``stage_id``: where a backfill-lane batch's outputs for
        it go (the lanes of the stages that read it; the topic itself if they have
        none, or nobody reads it)."""
        targets: dict[str, tuple[str, ...]] = {}
        for topic in self.outputs[stage_id]:
            lanes = tuple(
                dict.fromkeys(
                    lane for r in self.consumers.get(topic, ()) if (lane := self.lanes[r])
                )
            )
            targets[topic] = lanes or (topic,)
        return targets

    def components(self) -> list[tuple[str, ...]]:
        """Separate pipelines of one config: stages connected by topics."""
        left = list(self.order)
        found: list[tuple[str, ...]] = []
        while left:
            seen = {left[0]}
            todo = [left[0]]
            while todo:
                s = todo.pop()
                for other in (*self.downstream_of[s], *self.upstream_of[s]):
                    if other not in seen:
                        seen.add(other)
                        todo.append(other)
            found.append(tuple(s for s in self.order if s in seen))
            left = [s for s in left if s not in seen]
        return found

    def problems(self, stages: Mapping[str, Any], topics: Mapping[str, Any]) -> list[str]:
        """What ``pipeline topology --check`` reports (the config still loads)."""
        found: list[str] = []
        for s in self.order:
            for t in self.inputs[s]:
                if t not in self.producers and not getattr(topics[t], "external", False):
                    found.append(
                        f"stage {s} reads {t}, which no stage writes; mark the topic "
                        "`external: true` if producers outside the pipeline write it"
                    )
            spec = stages[s]
            if spec.state_topic is not None:
                tps = {
                    t: topics[t].partitions
                    for t in (*self.inputs[s], spec.backfill_lane, spec.state_topic)
                    if t is not None
                }
                if len(set(tps.values())) != 1:
                    found.append(
                        f"stateful stage {s}: inputs, backfill_lane and state_topic must have "
                        f"one partition count, they have {tps}"
                    )
        return found

    # -- pictures ------------------------------------------------------------------------------
    def text(self, stages: Mapping[str, Any]) -> str:
        lines: list[str] = []
        for n, component in enumerate(self.components(), start=1):
            if len(self.components()) > 1:
                lines.append(f"pipeline {n}:")
            for s in component:
                spec = stages[s]
                outs = ", ".join(self.outputs[s]) or "(sink: no output topic)"
                lines.append(f"  {', '.join(self.inputs[s])} -> [{s}] -> {outs}")
                extras = [f"uses {spec.uses}", f"dlq {spec.dlq}"]
                if spec.retry is not None:
                    extras.append(f"retry {spec.retry.topic}")
                if spec.backfill_lane:
                    extras.append(f"lane {spec.backfill_lane}")
                if spec.state_topic:
                    extras.append(f"state {spec.state_topic}")
                extras += [f"lookup {k}={v}" for k, v in spec.lookups.items()]
                lines.append("      " + "; ".join(extras))
        return "\n".join(lines)

    def mermaid(self, stages: Mapping[str, Any]) -> str:
        """A Mermaid flowchart: topics as rounded nodes, stages as boxes."""

        def node(topic: str) -> str:
            return "t_" + "".join(c if c.isalnum() else "_" for c in topic)

        lines = ["flowchart LR"]
        topics = dict.fromkeys(
            t for s in self.order for t in (*self.inputs[s], *self.outputs[s], *self.lookups[s])
        )
        lines += [f'  {node(t)}(["{t}"])' for t in topics]
        for s in self.order:
            lines.append(f'  s_{s.replace("-", "_")}["{s}"]')
            for t in self.inputs[s]:
                lines.append(f"  {node(t)} --> s_{s.replace('-', '_')}")
            for t in self.lookups[s]:
                lines.append(f"  {node(t)} -. lookup .-> s_{s.replace('-', '_')}")
            for t in self.outputs[s]:
                lines.append(f"  s_{s.replace('-', '_')} --> {node(t)}")
            dlq = stages[s].dlq
            lines.append(f'  s_{s.replace("-", "_")} -. dead letters .-> {node(dlq)}(["{dlq}"])')
        return "\n".join(lines)


def _topological(
    ids: Sequence[str], down: Mapping[str, Iterable[str]], up: Mapping[str, Sequence[str]]
) -> tuple[str, ...]:
    indegree = {s: len([a for a in up[s] if a != s]) for s in ids}
    order: list[str] = []
    ready = [s for s in ids if indegree[s] == 0]
    while ready:
        s = ready.pop(0)
        order.append(s)
        for b in down[s]:
            if b == s:
                continue
            indegree[b] -= 1
            if indegree[b] == 0:
                ready.append(b)
                ready.sort(key=list(ids).index)
    if len(order) != len(ids):
        stuck = [s for s in ids if s not in order]
        raise ValueError(f"the stages {stuck} form a cycle (each feeds the next through topics)")
    return tuple(order)
