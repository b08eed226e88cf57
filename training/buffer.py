"""Class-balanced replay buffer: up to ``spc`` samples per (domain, class), persisted as safetensors.

A VQA domain's samples keep their questions (a class is then an answer): :meth:`ReplayBuffer.domain` gives the
buffer back as a domain of the same kind, so a task's own batches and loss fit the merge coefficients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import load_file, save_file

from .artifacts import atomic_write

if TYPE_CHECKING:
    from .data import Domain


class ReplayBuffer:
    """Keeps ``spc`` samples per class of every seen domain (Coleman et al. 2024 use 1 and 5).

    ``policy="first"`` keeps the first ``spc`` of each class in the order given; ``"reservoir"`` keeps
    a uniform sample (reservoir sampling per class) drawn with the buffer's own generator.
    """

    def __init__(self, spc: int, policy: Literal["first", "reservoir"] = "first", seed: int = 0) -> None:
        if spc < 1:
            raise ValueError(f"spc must be >= 1, got {spc}")
        if policy not in ("first", "reservoir"):
            raise ValueError(f"unknown policy {policy!r}")
        self.spc, self.policy = spc, policy
        self.gen = torch.Generator().manual_seed(seed)
        self.slots: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.questions: dict[tuple[str, int], list[str]] = {}  # aligned with slots; VQA domains only
        self.seen: dict[tuple[str, int], int] = {}

    def add(self, domain: str, x: torch.Tensor, y: torch.Tensor, questions: list[str] | None = None) -> None:
        """Offer a domain's samples (uint8 (N, 3, H, W), int64 (N,), and one question each for VQA).

        Raises:
            ValueError: the images' shape differs from the buffered ones' (resize first: the buffer is
                stacked into one tensor, for the α fit and when saved), or questions are given for some
                domains and not others.
        """
        held = next((s[0].shape for s in self.slots.values() if s), None)
        if held is not None and len(x) and tuple(x.shape[1:]) != tuple(held):
            raise ValueError(f"{domain}: images of shape {tuple(x.shape[1:])} offered to a replay buffer holding "
                             f"{tuple(held)}; resize them to one size first")
        if self.slots and (questions is not None) != bool(self.questions):
            raise ValueError(f"{domain}: a replay buffer holds questions for every domain or for none")
        for i, (xi, yi) in enumerate(zip(x, y.tolist())):
            key = (domain, yi)
            slot = self.slots.setdefault(key, [])
            qs = self.questions.setdefault(key, []) if questions is not None else None
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            if len(slot) < self.spc:
                slot.append(xi.clone())
                if qs is not None:
                    qs.append(questions[i])
            elif self.policy == "reservoir" and (j := int(torch.randint(n + 1, (1,), generator=self.gen))) < self.spc:
                slot[j] = xi.clone()
                if qs is not None:
                    qs[j] = questions[i]

    def add_domain(self, d: Domain) -> None:
        """:meth:`add` a domain's training split, with its questions when it has them (a VQA domain)."""
        self.add(d.name, d.x_train, d.y_train, getattr(d, "q_train", None))

    def domain(self, name: str = "buffer") -> Domain:
        """The buffered samples as the training split of one domain (a ``VqaDomain`` when they carry
        questions), ordered as :meth:`tensors`: what a task's batches and loss read."""
        from .data import Domain

        x, y = self.tensors()
        empty = torch.empty(0)
        if not self.questions:
            return Domain(name, x, y, empty, empty)
        from .data.scenes import VqaDomain

        qs = [q for k in sorted(self.slots) for q in self.questions[k]]
        return VqaDomain(name, x, y, empty, empty.long(), q_train=qs)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All buffered images and labels, ordered by (domain, class)."""
        keys = sorted(self.slots)
        xs = [x for k in keys for x in self.slots[k]]
        ys = [k[1] for k in keys for _ in self.slots[k]]
        if not xs:
            raise ValueError("the replay buffer is empty")
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    def map_images(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every buffered image batch-wise: ``fn`` maps uint8 (N, 3, H, W) to (N, 3, H', W')."""
        for key, xs in self.slots.items():
            if xs:
                self.slots[key] = list(fn(torch.stack(xs)))

    def __len__(self) -> int:
        return sum(len(v) for v in self.slots.values())

    def domains(self) -> list[str]:
        """Domains present, in first-seen order."""
        return list(dict.fromkeys(k[0] for k in self.slots))

    def subset(self, domains: list[str], spc: int) -> ReplayBuffer:
        """A buffer of the first ``spc`` samples per class of ``domains`` only (e.g. the paper's 1 of 5)."""
        out = ReplayBuffer(spc, self.policy)
        for (dom, c), xs in self.slots.items():
            if dom in domains:
                out.slots[(dom, c)] = xs[:spc]
                out.seen[(dom, c)] = self.seen.get((dom, c), len(xs))
                if self.questions:
                    out.questions[(dom, c)] = self.questions[(dom, c)][:spc]
        return out

    def save(self, path: str) -> None:
        """Persist atomically as safetensors (images, labels, domain index) with metadata."""
        keys = sorted(self.slots)
        doms = self.domains()
        x, y = self.tensors()
        d = torch.tensor([doms.index(k[0]) for k in keys for _ in self.slots[k]], dtype=torch.int64)
        meta = {
            "spc": str(self.spc),
            "policy": self.policy,
            "domains": json.dumps(doms),
            "seen": json.dumps([[k[0], k[1], self.seen[k]] for k in keys]),
        }
        if self.questions:  # one per image, in the tensors' order
            meta["questions"] = json.dumps([q for k in keys for q in self.questions[k]])
        atomic_write(path, lambda p: save_file({"x": x.contiguous(), "y": y, "domain": d}, p, metadata=meta))

    @classmethod
    def load(cls, path: str) -> ReplayBuffer:
        """Inverse of :meth:`save`."""
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata()
        t = load_file(path)
        buf = cls(int(meta["spc"]), meta["policy"])  # type: ignore[arg-type]
        doms = json.loads(meta["domains"])
        qs = json.loads(meta["questions"]) if "questions" in meta else None
        for i, (xi, yi, di) in enumerate(zip(t["x"], t["y"].tolist(), t["domain"].tolist())):
            buf.slots.setdefault((doms[di], yi), []).append(xi)
            if qs is not None:
                buf.questions.setdefault((doms[di], yi), []).append(qs[i])
        buf.seen = {(d, c): n for d, c, n in json.loads(meta["seen"])}
        return buf
