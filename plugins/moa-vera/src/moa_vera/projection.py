"""VeRA's frozen random projections: one ``vera_A`` / ``vera_B`` pair per adapter.

PEFT draws ``vera_A [r, max_in]`` and then ``vera_B [max_out, r]`` from one CPU generator
seeded with ``projection_prng_key``, each Kaiming-uniform (``bound = sqrt(3) * sqrt(2) /
sqrt(fan_in)``, ``fan_in`` = the tensor's second dimension), where ``max_in`` / ``max_out``
are the largest input / output widths over the adapter's target modules. Every module
uses the top-left slice it needs: ``A[:, :H_in]`` and ``B[:H_out, :]``.
:func:`generate_projection` repeats that draw number for number, so an adapter saved
without its projections (``save_projection=False``) gets PEFT's exact matrices back.

A :class:`VeraProjection` collects the widths of an adapter's modules as its layers are
built, is *fixed* once they all exist (when the adapter is loaded or installed) and then
draws, or takes from the file, the matrices. Identical matrices (same seed and shapes, or
equal tensors from files) are held once in memory and shared by all the adapters that
use them, on every device they are used on.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch

from moa.errors import AdapterShapeError

#: Serialises the (rare) creation and moving of shared matrices; never held during a forward's math.
_LOCK = threading.Lock()
#: (seed, r, max_in, max_out) -> the matrices drawn or loaded for it, while any adapter uses them.
_SHARED: weakref.WeakValueDictionary[tuple[int, int, int, int], ProjectionPair] = weakref.WeakValueDictionary()
#: Attribute of a config object holding the projection its layers share (see VeraProjection.of).
_CONFIG_ATTRIBUTE = "_moa_vera_projection"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA initialisation of one projection: Kaiming-uniform from ``generator``.

    Args:
        shape: ``(rows, fan_in)``.
        generator: The CPU generator to draw from (advanced by ``rows * fan_in`` numbers).

    Returns:
        A float32 CPU tensor, ``uniform(-b, b)`` with ``b = sqrt(3) * sqrt(2) / sqrt(fan_in)``.
    """
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def generate_projection(r: int, max_in: int, max_out: int, prng_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vera_A [r, max_in], vera_B [max_out, r])`` exactly as PEFT draws them.

    Args:
        r: The adapter's rank.
        max_in: Largest input width over the adapter's target modules.
        max_out: Largest output width over them.
        prng_key: ``projection_prng_key`` of the config.

    Returns:
        Float32 CPU tensors; ``A`` is drawn first, then ``B``, from one generator.
    """
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    lora_a = kaiming_uniform((r, max_in), generator)
    lora_b = kaiming_uniform((max_out, r), generator)
    return lora_a, lora_b


class ProjectionPair:
    """One pair of frozen matrices, shared by every adapter whose projection it is.

    Args:
        vera_a: ``[r, max_in]`` float32.
        vera_b: ``[max_out, r]`` float32.
    """

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor):
        self.vera_a = vera_a.detach().to(dtype=torch.float32).contiguous()
        self.vera_b = vera_b.detach().to(dtype=torch.float32).contiguous()
        self._copies: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {
            (self.vera_a.device, torch.float32): (self.vera_a, self.vera_b)}

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrices on ``device`` in ``dtype``, moved once and then reused."""
        key = (torch.device(device), dtype)
        copies = self._copies.get(key)
        if copies is None:
            with _LOCK:
                copies = self._copies.get(key)
                if copies is None:
                    copies = (self.vera_a.to(device=device, dtype=dtype), self.vera_b.to(device=device, dtype=dtype))
                    self._copies = {**self._copies, key: copies}  # replaced whole: readers never see it half-built
        return copies

    def nbytes(self) -> int:
        """Bytes of the float32 matrices (one copy)."""
        return self.vera_a.numel() * 4 + self.vera_b.numel() * 4


def shared_pair(key: tuple[int, int, int, int], vera_a: torch.Tensor | None = None,
                vera_b: torch.Tensor | None = None) -> ProjectionPair:
    """The pair for ``key`` = (seed, r, max_in, max_out): drawn, or given, and shared when identical.

    Args:
        key: ``(projection_prng_key, r, max_in, max_out)``.
        vera_a: Matrices read from a file, or ``None`` to draw them from the seed.
        vera_b: As ``vera_a``.

    Returns:
        An existing pair with equal matrices if one is in use, else a new one.
    """
    with _LOCK:
        existing = _SHARED.get(key)
    if vera_a is None or vera_b is None:
        if existing is not None:
            return existing
        pair = ProjectionPair(*generate_projection(key[1], key[2], key[3], key[0]))
    else:
        if (existing is not None and torch.equal(existing.vera_a, vera_a.to(torch.float32))
                and torch.equal(existing.vera_b, vera_b.to(torch.float32))):
            return existing
        pair = ProjectionPair(vera_a, vera_b)
    with _LOCK:
        current = _SHARED.get(key)
        if current is None:
            _SHARED[key] = pair
        elif vera_a is None:
            return current  # another thread drew the same matrices first
    return pair


class VeraProjection:
    """The projection of one adapter: its rank, seed, modules' widths and (once fixed) matrices.

    Args:
        r: The adapter's rank.
        prng_key: Its ``projection_prng_key``.

    Attributes:
        r: Rank.
        prng_key: Seed.
        shapes: ``(in_features, out_features)`` of every module registered so far.
        fixed: Whether the widths are final (every layer of the adapter exists).
    """

    def __init__(self, r: int, prng_key: int):
        self.r = int(r)
        self.prng_key = int(prng_key)
        self.shapes: set[tuple[int, int]] = set()
        self.fixed = False
        self._dims: tuple[int, int] | None = None
        self._pair: ProjectionPair | None = None

    @classmethod
    def of(cls, config: Any) -> VeraProjection:
        """The projection shared by the layers built from ``config`` (one per adapter).

        moa builds all the layers of an adapter from one config object, so the projection
        rides on that object (as a plain attribute, not a config field).

        Args:
            config: A :class:`~moa_vera.VeraConfig`.
        """
        projection = config.__dict__.get(_CONFIG_ATTRIBUTE)
        if (not isinstance(projection, cls) or projection.r != config.r
                or projection.prng_key != config.projection_prng_key):
            projection = cls(config.r, config.projection_prng_key)
            config.__dict__[_CONFIG_ATTRIBUTE] = projection
        return projection

    # -- widths ----------------------------------------------------------------------------

    def register(self, in_features: int, out_features: int, module_name: str = "?") -> None:
        """Add one module's widths; once fixed, only widths within the matrices are accepted.

        Raises:
            AdapterShapeError: The projection is fixed and smaller than this module needs.
        """
        if self.fixed:
            max_in, max_out = self.dims
            if in_features > max_in or out_features > max_out:
                raise AdapterShapeError(
                    f"VeRA module {module_name!r} needs projections of at least {in_features} inputs and "
                    f"{out_features} outputs, but this adapter's are fixed at {max_in} and {max_out}. Build every "
                    f"module of an adapter from one VeraConfig (model.add_adapter does), or use a new config.")
        self.shapes.add((int(in_features), int(out_features)))

    @property
    def dims(self) -> tuple[int, int]:
        """``(max_in, max_out)`` over the registered modules (PEFT's ``_find_dim``)."""
        if self._dims is not None:
            return self._dims
        if not self.shapes:
            raise AdapterShapeError("This VeRA projection has no modules yet; build a VeraLayer first.")
        return max(s[0] for s in self.shapes), max(s[1] for s in self.shapes)

    def fix(self) -> None:
        """Freeze the widths: every layer of the adapter has been built."""
        if not self.fixed:
            self._dims = self.dims
            self.fixed = True

    @property
    def key(self) -> tuple[int, int, int, int]:
        """``(prng_key, r, max_in, max_out)``: what determines the drawn matrices."""
        max_in, max_out = self.dims
        return self.prng_key, self.r, max_in, max_out

    # -- matrices --------------------------------------------------------------------------

    def expected_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of ``vera_A`` and ``vera_B``: ``(r, max_in)`` and ``(max_out, r)``."""
        max_in, max_out = self.dims
        return (self.r, max_in), (max_out, self.r)

    def load(self, vera_a: torch.Tensor, vera_b: torch.Tensor, source: str = "the adapter file") -> None:
        """Use the matrices read from a file instead of drawing them (fixes the widths).

        Raises:
            AdapterShapeError: Their shapes are not ``(r, max_in)`` / ``(max_out, r)``.
        """
        self.fix()
        for name, tensor, want in zip(("vera_A", "vera_B"), (vera_a, vera_b), self.expected_shapes(), strict=True):
            if tuple(tensor.shape) != want:
                raise AdapterShapeError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but this adapter needs {want} "
                    f"(r={self.r}, largest module widths in={self.dims[0]}, out={self.dims[1]}). The adapter was "
                    f"probably made for another base model or other target modules.")
        self._pair = shared_pair(self.key, vera_a, vera_b)

    def pair(self) -> ProjectionPair:
        """The matrices: loaded, or drawn from the seed on first use (which fixes the widths)."""
        pair = self._pair
        if pair is None:
            self.fix()
            pair = self._pair = shared_pair(self.key)
        return pair

    def slices(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, :in_features], B[:out_features, :])`` on ``device`` in ``dtype`` (views, no copy)."""
        vera_a, vera_b = self.pair().on(device, dtype)
        return vera_a[:, :in_features], vera_b[:out_features, :]

    def __deepcopy__(self, memo: dict) -> VeraProjection:
        # the matrices are frozen and shared by design: a copied model shares them too
        copy = VeraProjection(self.r, self.prng_key)
        copy.shapes, copy.fixed, copy._dims, copy._pair = set(self.shapes), self.fixed, self._dims, self._pair
        memo[id(self)] = copy
        return copy
