"""Pipeline bubble counted from a schedule's action lists (torch's schedule IR), not from timings.

Each rank runs its compute actions in the listed order; an action starts when its rank is free and its
inputs exist: F(s, m) after F(s-1, m); a backward of (s, m) after F(s, m) and the backward of (s+1, m);
W(s, m) after I(s, m). Costs in slots: F = 1, full backward B = 2, its halves I = W = 1 (a backward costs
about two forwards). Idle slots are the gaps on every rank up to the makespan. For 1F1B over p ranks and m
micro-batches this gives the textbook (p-1)/(m+p-1); v virtual stages per rank divide the warm-up and
cool-down by v: (p-1)/(v*m+p-1)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.pipelining.schedules import _ComputationType

_F, _B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
_I, _W = _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT
_OVERLAP = _ComputationType.OVERLAP_F_B
SLOT_COST = {_F: 1, _B: 2, _I: 1, _W: 1}


@dataclass(frozen=True)
class BubbleReport:
    makespan: int  # slots from the first action to the last, on the slowest rank
    busy: dict[int, int]  # rank -> slots spent computing
    idle: dict[int, int]  # rank -> slots spent waiting

    @property
    def fraction(self) -> float:
        """Idle slots over all slots of all ranks."""
        return sum(self.idle.values()) / (self.makespan * len(self.idle))


def _compute_actions(actions) -> list:
    flat = []
    for action in actions:
        if action is None:
            continue
        if action.computation_type == _OVERLAP:  # DualPipeV: a forward and a backward run together
            flat.extend(a for a in action.sub_actions if a.computation_type in SLOT_COST)
        elif action.computation_type in SLOT_COST:
            flat.append(action)
    return flat


def _dependencies(action, num_stages: int) -> list[tuple]:
    s, m, kind = action.stage_index, action.microbatch_index, action.computation_type
    if kind == _F:
        return [("F", s - 1, m)] if s > 0 else []
    if kind == _W:
        return [("I", s, m)]
    deps = [("F", s, m)]  # a full or input backward
    if s < num_stages - 1:
        deps.append(("I", s + 1, m))
    return deps


def simulate(pipeline_order: dict[int, list], num_stages: int) -> BubbleReport:
    """Replays every rank's compute actions in order with SLOT_COST durations; raises on a deadlock."""
    queues = {rank: _compute_actions(actions) for rank, actions in pipeline_order.items()}
    position = {rank: 0 for rank in queues}
    clock = {rank: 0 for rank in queues}
    busy = {rank: 0 for rank in queues}
    finished: dict[tuple, int] = {}  # ("F" | "I", stage, micro-batch) -> finish slot; B finishes both I and W
    remaining = sum(len(q) for q in queues.values())
    while remaining:
        progressed = False
        for rank, queue in queues.items():
            while position[rank] < len(queue):
                action = queue[position[rank]]
                deps = _dependencies(action, num_stages)
                if any(d not in finished for d in deps):
                    break
                start = max([clock[rank]] + [finished[d] for d in deps])
                cost = SLOT_COST[action.computation_type]
                clock[rank] = start + cost
                busy[rank] += cost
                s, m, kind = action.stage_index, action.microbatch_index, action.computation_type
                finished[("F" if kind == _F else "I" if kind in (_B, _I) else "W", s, m)] = clock[rank]
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: q[position[r]] for r, q in queues.items() if position[r] < len(q)}
            raise RuntimeError(f"the schedule deadlocks: ranks wait on each other at {stuck}")
    makespan = max(clock.values())
    return BubbleReport(makespan, busy, {rank: makespan - busy[rank] for rank in queues})


def schedule_bubble(schedule) -> BubbleReport:
    """The bubble of a built torch schedule (its pipeline_order IR, all ranks)."""
    order = schedule.pipeline_order
    num_stages = schedule._num_stages
    return simulate(order, num_stages)
