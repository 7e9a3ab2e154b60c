"""ParallelDims: the parallel degrees, validated before any process group exists, and the one DeviceMesh.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp. tp is innermost so a tensor-parallel
group sits on neighbouring ranks (one node's NVLink); pp is outermost so stages cross the slow links. Only
degrees > 1 become mesh dimensions; the data-parallel dimensions are also flattened into "dp" (the batch is
split over it) when both are present. The mesh is passed explicitly; nothing here is global."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from scaletrain.configs.schema import ParallelConfig
from scaletrain.errors import ConfigError

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int
    zero: int = 0
    engine: str = "native"  # parallel.engine: native (FSDP2 / DTensor) | deepspeed (DeepSpeed owns dp / ZeRO)
    mesh: Optional[object] = field(default=None, repr=False)  # DeviceMesh once build_mesh ran

    def __post_init__(self) -> None:
        for name in MESH_ORDER:
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees dp_replicate x dp_shard x tp x pp x cp = {self.dp_replicate} x {self.dp_shard} "
                f"x {self.tp} x {self.pp} x {self.cp} = {product} but the world size is {self.world_size}; "
                f"change the degrees or the number of processes")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero={self.zero} is not one of 0, 1, 2, 3")

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> "ParallelDims":
        others = parallel.dp_replicate * parallel.tp * parallel.pp * parallel.cp
        dp_shard = parallel.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} is not divisible by dp_replicate x tp x pp x cp = {others}; "
                    f"change the degrees or the number of processes")
            dp_shard = world_size // others
        return cls(parallel.dp_replicate, dp_shard, parallel.tp, parallel.pp, parallel.cp, world_size,
                   zero=parallel.zero, engine=parallel.engine)

    # ---- degrees -----------------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded over dp_shard (ZeRO 2/3); zero 0/1 replicate them over every dp rank."""
        return self.zero >= 2 and self.dp_shard > 1

    def enabled_dims(self) -> list[str]:
        return [name for name in MESH_ORDER if getattr(self, name) > 1]

    # ---- mesh --------------------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu"):
        """One named DeviceMesh over the enabled dimensions; None for a single process."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        names = self.enabled_dims()
        mesh = init_device_mesh(device_type, [getattr(self, n) for n in names], mesh_dim_names=tuple(names))
        dp_names = [n for n in ("dp_replicate", "dp_shard") if n in names]
        if len(dp_names) == 2:
            mesh[tuple(dp_names)]._flatten("dp")
        if "dp_shard" in names and "tp" in names:
            # FSDP x TP gradients are sharded over both: with this flattened view DTensor reduces their norm
            # (clipping) in one collective instead of one per dimension
            mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
        self.mesh = mesh
        return mesh

    def _require_mesh(self):
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must run before a sub-mesh is used")
        return self.mesh

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.tp_enabled else None

    @property
    def dp_mesh_flat(self):
        """All data-parallel ranks as one 1-D mesh (the batch is split over it); None without dp."""
        if not self.dp_enabled:
            return None
        mesh = self._require_mesh()
        if self.dp_replicate > 1 and self.dp_shard > 1:
            return mesh["dp"]
        return mesh["dp_replicate" if self.dp_replicate > 1 else "dp_shard"]

    @property
    def fsdp_mesh(self):
        """The mesh fully_shard gets: 1-D dp_shard (FSDP) or 2-D (dp_replicate, dp_shard) (HSDP)."""
        mesh = self._require_mesh()
        if self.dp_replicate > 1:
            return mesh["dp_replicate", "dp_shard"]
        return mesh["dp_shard"]

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks: which slice of the global batch it reads."""
        mesh = self.dp_mesh_flat
        return 0 if mesh is None else mesh.get_local_rank()

    @property
    def tp_rank(self) -> int:
        return 0 if not self.tp_enabled else self.mesh["tp"].get_local_rank()

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in MESH_ORDER] + [f"zero={self.zero}"]
        if self.engine != "native":
            parts.append(f"engine={self.engine}")
        return f"ParallelDims({', '.join(parts)}, world={self.world_size})"
