"""How every fast module is made from the exact module it replaces.

A fast twin computes what its exact module computes, faster, with the exact module's
parameters. :meth:`FastTwin.from_exact` is the one constructor of every twin in
:mod:`napari_sam.speed`: the twin starts as a view of the exact module (the same parameters,
buffers and submodules, by reference, under the same names and in the same order, and the same
plain attributes such as sizes and flags), then its :meth:`~FastTwin.speed_up` swaps the
submodules that have twins of their own and prepares derived weights. So a twin's state dict is
the exact module's, loading weights into either changes both, and no twin lists by hand what
it copies from its exact module.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from torch import nn

__all__ = ["FastTwin", "is_fast"]

T = TypeVar("T", bound="FastTwin")


class FastTwin(nn.Module):
    """Base of the fast modules (before the exact class, when a twin also subclasses it).

    Subclasses name the class they stand in for (``exact_type``), override
    :meth:`speed_up`, and define no ``__init__``: they are made by :meth:`from_exact` only.
    Twins are for inference: their own ``training`` flag is off (the shared submodules keep
    theirs, which belongs to the exact model's owner).
    """

    exact_type: ClassVar[type[nn.Module]] = nn.Module

    @classmethod
    def accepts(cls, module: object) -> bool:
        """Whether ``module`` is an ``exact_type`` itself.

        Not a subclass: a subclass may compute something else (SAM 2's mask decoder is a
        ``MaskDecoder`` with high-resolution skips), which the twin would silently drop.
        """
        return type(module) is cls.exact_type

    @classmethod
    def from_exact(cls: type[T], exact: nn.Module, **settings: Any) -> T:
        """The twin of ``exact``, sharing its state; ``settings`` go to :meth:`speed_up`.

        Raises
        ------
        TypeError
            When ``exact`` is not an ``exact_type`` (see :meth:`accepts`).
        """
        if not cls.accepts(exact):
            raise TypeError(
                f"{cls.__name__} is made from a {cls.exact_type.__name__}, "
                f"got {type(exact).__name__}"
            )
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)  # fresh hooks and registries; filled from ``exact`` below
        own = set(vars(twin))
        for name, value in vars(exact).items():
            if name not in own:  # plain attributes (sizes, flags, the model's spec)
                twin.__dict__[name] = value
        twin._parameters.update(exact._parameters)
        twin._buffers.update(exact._buffers)
        twin._non_persistent_buffers_set.update(exact._non_persistent_buffers_set)
        twin._modules.update(exact._modules)
        twin.training = False
        twin.speed_up(exact, **settings)
        return twin

    # (*args, **settings): subclasses declare ``speed_up(self, exact, <their settings>)``.
    def speed_up(self, *args: Any, **settings: Any) -> None:
        """``speed_up(exact, **settings)``: swap in the fast parts.

        Replaces shared submodules by their twins and sets up derived state; by default
        nothing, and no settings are taken.

        Assigning to an existing submodule's name keeps its place in the state dict.
        """
        if settings:
            raise TypeError(f"{type(self).__name__} takes no settings, got {sorted(settings)}")


def is_fast(module: Any) -> bool:
    """Whether ``module`` is a fast twin (e.g. a model from :func:`napari_sam.speed.optimize`).

    Any object is accepted: models of other kinds, wrappers and stand-ins are not fast.
    """
    return isinstance(module, FastTwin)
