"""Supervised MIL: any registered head trained on labelled bags, a scikit-learn estimator."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch.nn.functional import cross_entropy

from wsi_ssl._persist import MODEL_FILE, load_estimator, save_estimator
from wsi_ssl._utils import resolve_device
from wsi_ssl._validation import Interval, Options, validate_params
from wsi_ssl.errors import ConfigError, InputError, LabelError, NotFittedError, WeightsError
from wsi_ssl.mil._base import create_head, require_attention
from wsi_ssl.mil._coords import to_grid_units

__all__ = ["MILClassifier"]

logger = logging.getLogger(__name__)

_FORMAT = "wsi-ssl-mil-classifier"
#: tiles scored per forward pass by :meth:`MILClassifier.tile_scores`
_TILE_CHUNK = 4096


class MILClassifier(ClassifierMixin, BaseEstimator):
    """A MIL head (:func:`~wsi_ssl.mil.create_head`) trained with cross-entropy on labelled bags.

    A scikit-learn estimator (``get_params`` / ``set_params``, ``sklearn.clone``, ``score``):
    ``__init__`` only stores its arguments, ``fit`` validates them and returns ``self``.
    Features are standardised with the training instances' mean and std (``standardize=True``);
    bags are padded into mini-batches with exact masks; training is deterministic for a given
    ``seed`` (on the CPU; CUDA kernels may add tiny run-to-run noise).

    Args:
        head: a name from :func:`~wsi_ssl.mil.list_heads` (the one positional argument, as in
            ``MILClassifier("abmil")``; ``sklearn.clone`` passes every argument by keyword).
        embed_dim: the head's ``embed_dim`` (per-tile projection size).
        dropout: dropout in the head.
        lr: Adam learning rate.
        epochs: passes over the training bags (the maximum with ``early_stopping``).
        weight_decay: Adam L2 weight decay.
        batch_size: bags per optimisation step.
        class_weight: ``"balanced"`` (loss weights ``n / (C * n_c)``) or ``None``.
        early_stopping: patience in epochs on the loss of a stratified validation split of
            ``validation_fraction`` of the training bags (best weights restored); ``None`` = off.
        validation_fraction: share of training bags held out when ``early_stopping`` is set.
        standardize: z-score features with training statistics.
        head_kwargs: extra options for the head (``attn_dim=``, ``attention="full"``, ...).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seeds initialisation, shuffling, dropout and the validation split.

    Attributes:
        classes_: sorted class labels. n_features_in_: ``D``. head_: the trained head (eval mode).
        mean_, scale_: standardisation statistics ``(D,)``. history_: per-epoch training loss
        (and ``val_loss`` with early stopping). n_epochs_: epochs actually run.
        best_epoch_: the epoch whose weights were kept (``n_epochs_`` without early stopping).
        validation_indices_: indices of the bags held out for early stopping (empty without).

    ``save(dir)`` / ``MILClassifier.load(dir)`` write and read the fitted classifier
    (safetensors weights + JSON config, like ``SlideSSL``).
    """

    def __init__(self, head: str = "abmil", *, embed_dim: int = 128, dropout: float = 0.0,
                 lr: float = 5e-4, epochs: int = 40, weight_decay: float = 1e-4,
                 batch_size: int = 8, class_weight: Literal["balanced"] | None = "balanced",
                 early_stopping: int | None = None, validation_fraction: float = 0.2,
                 standardize: bool = True, head_kwargs: dict[str, Any] | None = None,
                 device: str = "auto", seed: int = 0) -> None:
        self.head = head
        self.embed_dim = embed_dim
        self.dropout = dropout
        self.lr = lr
        self.epochs = epochs
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.class_weight = class_weight
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.standardize = standardize
        self.head_kwargs = head_kwargs
        self.device = device
        self.seed = seed

    # -- inputs ---------------------------------------------------------------------------------
    _parameter_constraints: dict[str, list[Any]] = {
        "head": [str],
        "embed_dim": [Interval(int, 1, None)],
        "dropout": [Interval(float, 0, 1, closed="left")],
        "lr": [Interval(float, 0, None, closed="neither")],
        "epochs": [Interval(int, 1, None)],
        "weight_decay": [Interval(float, 0, None)],
        "batch_size": [Interval(int, 1, None)],
        "class_weight": [Options({"balanced"}), None],
        "early_stopping": [Interval(int, 1, None), None],
        "validation_fraction": [Interval(float, 0, 1, closed="neither")],
        "standardize": [bool],
        "head_kwargs": [dict, None],
        "device": [str],
        "seed": [Interval(int, 0, None)],
    }

    def _check_params(self) -> None:
        validate_params("MILClassifier", self.get_params(deep=False),
                        self._parameter_constraints)

    def _load(self, bags: Any, coords: Sequence[Any] | None, slide_ids: Sequence[str] | None,
              n_features: int | None) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Bags (and grid-unit coords) as float32 arrays, checked."""
        names: list[str]
        if slide_ids is not None:  # a TileStore (duck-typed: store[sid].features / .coords)
            if isinstance(slide_ids, str):
                slide_ids = [slide_ids]
            feats, crd = [], []
            for sid in slide_ids:
                try:
                    rec = bags[sid]
                except KeyError as err:
                    why = err.args[0] if err.args else f"slide id {sid!r} is not in the store"
                    raise InputError(f"slide_ids: {why}") from err
                feats.append(rec.features)
                attrs = getattr(rec, "attrs", None) or {}
                rc = getattr(rec, "coords", None)
                crd.append(None if rc is None else to_grid_units(rc, attrs))
            coords = None if any(c is None for c in crd) else crd
            bags, names = feats, [f"bag {i} ({sid!r})" for i, sid in enumerate(slide_ids)]
        else:
            if hasattr(bags, "slide_ids") and not isinstance(bags, (list, tuple)):
                raise InputError("bags looks like a TileStore: pass slide_ids=[...] with it.")
            if isinstance(bags, np.ndarray) and bags.dtype != object:
                raise InputError(
                    f"bags must be a list of (n_i, D) arrays, one per bag; got one array of shape "
                    f"{bags.shape}. Use list(bags) if each row of axis 0 is a bag."
                )
            bags = list(bags)
            names = [f"bag {i}" for i in range(len(bags))]
        if not bags:
            raise InputError("bags is empty; pass at least one (n_i, D) array.")
        out = []
        for name, b in zip(names, bags, strict=True):
            a = np.asarray(b, dtype=np.float32)
            if a.ndim != 2:
                raise InputError(f"{name} has shape {a.shape}; every bag must be (n_i, D).")
            if a.shape[0] == 0:
                raise InputError(f"{name} is empty (0 tiles); drop it or give it tiles.")
            if n_features is None:
                n_features = a.shape[1]
            if a.shape[1] != n_features:
                raise InputError(
                    f"{name} has feature dim {a.shape[1]}, expected {n_features} (the first bag "
                    "/ the training data); use features from one encoder."
                )
            if not np.isfinite(a).all():
                raise InputError(f"{name} contains NaN or inf features; clean or drop it.")
            out.append(a)
        crd_out = None
        if coords is not None:
            coords = list(coords)
            if len(coords) != len(out):
                raise InputError(f"coords has {len(coords)} entries for {len(out)} bags.")
            crd_out = []
            for name, a, c in zip(names, out, coords, strict=True):
                c = np.asarray(c, dtype=np.float32)
                if c.shape != (a.shape[0], 2):
                    raise InputError(f"{name}: coords shape {c.shape}, expected {(a.shape[0], 2)}.")
                crd_out.append(c)
        return out, crd_out

    def _collate(self, bags, coords, idx, device):

        n = max(bags[i].shape[0] for i in idx)
        d = bags[idx[0]].shape[1]
        x = np.zeros((len(idx), n, d), np.float32)
        mask = np.zeros((len(idx), n), bool)
        crd = np.zeros((len(idx), n, 2), np.float32) if coords is not None else None
        for j, i in enumerate(idx):
            k = bags[i].shape[0]
            x[j, :k] = (bags[i] - self.mean_) / self.scale_
            mask[j, :k] = True
            if crd is not None:
                crd[j, :k] = coords[i]
        xt = torch.from_numpy(x).to(device)
        ct = torch.from_numpy(crd).to(device) if crd is not None else None
        return xt, torch.from_numpy(mask).to(device), ct

    # -- fit / predict --------------------------------------------------------------------------
    def fit(self, bags: Any, y: Sequence[Any] | np.ndarray, *,
            coords: Sequence[Any] | None = None,
            slide_ids: Sequence[str] | None = None) -> MILClassifier:
        """Train on labelled bags.

        Args:
            bags: list of ``(n_i, D)`` arrays, or a ``TileStore`` together with ``slide_ids``.
            y: one label per bag (any hashable labels; two or more classes).
            coords: per-bag ``(n_i, 2)`` tile positions in grid units (coordinate-aware heads);
                read from the store (level-0 px / stride) when ``slide_ids`` is given.
            slide_ids: the store's slides to use, in the order of ``y``.

        Returns:
            self.
        """


        self._check_params()
        embed_dim = self.embed_dim
        xs, cs = self._load(bags, coords, slide_ids, None)
        y_idx = self._encode_labels(y, len(xs))
        dev = resolve_device(self.device)
        self._fit_scaler(np.concatenate(xs))
        rng = np.random.default_rng(self.seed)
        train, val = self._split(y_idx, rng)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed)
            head = create_head(self.head, self.n_features_in_, n_classes=len(self.classes_),
                               embed_dim=embed_dim, dropout=self.dropout,
                               **(self.head_kwargs or {})).to(dev)
            if head.uses_coords and cs is None:
                raise InputError(
                    f"head {self.head!r} is coordinate-aware: pass coords=[(n_i, 2), ...] in grid "
                    "units (or a TileStore with slide_ids)."
                )
            self.history_, self.best_epoch_ = self._train(head, xs, cs, y_idx, train, val, rng,
                                                          dev)
        head.eval()
        self.head_ = head
        self.n_epochs_ = len(self.history_)
        self.validation_indices_ = val
        self.device_ = dev
        return self

    def _encode_labels(self, y: Any, n_bags: int) -> np.ndarray:
        """Check ``y``, set ``classes_`` and return the class index of every bag."""
        y_arr = np.asarray(y)
        if y_arr.ndim != 1 or len(y_arr) != n_bags:
            raise LabelError(
                f"y has {y_arr.shape} labels for {n_bags} bags; pass one label per bag."
            )
        if y_arr.dtype.kind == "f" and np.isnan(y_arr).any():
            raise LabelError(f"y has NaN labels at {np.flatnonzero(np.isnan(y_arr))[:5].tolist()}.")
        classes, y_idx = np.unique(y_arr, return_inverse=True)
        if len(classes) < 2:
            raise LabelError(
                f"y has one class only ({classes.tolist()}); a classifier needs two or more."
            )
        self.classes_ = classes
        return y_idx

    def _fit_scaler(self, allx: np.ndarray) -> None:
        """``mean_``, ``scale_`` (identity when ``standardize=False``) and ``n_features_in_``."""
        mean = allx.mean(0) if self.standardize else np.zeros(allx.shape[1], np.float32)
        std = allx.std(0) if self.standardize else np.ones(allx.shape[1], np.float32)
        self.scale_ = np.where(std > 1e-8, std, 1.0).astype(np.float32)
        self.mean_ = mean.astype(np.float32)
        self.n_features_in_ = int(allx.shape[1])

    def _split(self, y_idx: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
        """Training and (stratified, ``early_stopping`` only) validation bag indices."""
        train = np.arange(len(y_idx))
        if self.early_stopping is None:
            return train, np.array([], dtype=int)
        val_parts = []
        for c in range(len(self.classes_)):
            members = rng.permutation(np.flatnonzero(y_idx == c))
            k = min(len(members) - 1, int(round(self.validation_fraction * len(members))))
            val_parts.append(members[:max(k, 0)])
        val = np.sort(np.concatenate(val_parts))
        return np.setdiff1d(train, val), val

    def _class_weight_tensor(self, y_train: np.ndarray, dev: Any) -> Any:

        if self.class_weight != "balanced":
            return None
        n_cls = len(self.classes_)
        counts = np.bincount(y_train, minlength=n_cls).astype(np.float64)
        return torch.tensor(len(y_train) / (n_cls * np.maximum(counts, 1)), dtype=torch.float32,
                            device=dev)

    def _train(self, head: Any, xs: list[np.ndarray], cs: list[np.ndarray] | None,
               y_idx: np.ndarray, train: np.ndarray, val: np.ndarray, rng: np.random.Generator,
               dev: Any) -> tuple[list[dict[str, float]], int]:
        """The epoch loop; with a validation split, stop after ``early_stopping`` epochs without
        a better validation loss and restore the best weights. Returns (history, best epoch)."""
        weight = self._class_weight_tensor(y_idx[train], dev)
        opt = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        yt = torch.as_tensor(y_idx, device=dev)
        best, best_epoch, best_loss, bad = None, 0, float("inf"), 0
        history: list[dict[str, float]] = []
        for epoch in range(self.epochs):
            head.train()
            order = rng.permutation(train)
            total = 0.0
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                x, m, c = self._collate(xs, cs, idx, dev)
                loss = cross_entropy(head(x, mask=m, coords=c).logits, yt[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            rec = {"epoch": epoch + 1, "loss": total / len(train)}
            if len(val):
                head.eval()
                with torch.no_grad():
                    p = self._forward(head, xs, cs, val, dev)
                    rec["val_loss"] = float(cross_entropy(torch.log(p.clamp_min(1e-12)), yt[val],
                                                          weight=weight))
                if rec["val_loss"] < best_loss - 1e-6:
                    best_loss, best_epoch, bad = rec["val_loss"], epoch + 1, 0
                    best = copy.deepcopy(head.state_dict())
                else:
                    bad += 1
            history.append(rec)
            logger.debug("MILClassifier epoch %s", rec)
            if len(val) and bad >= self.early_stopping:
                break
        if best is None:
            return history, len(history)
        head.load_state_dict(best)
        return history, best_epoch

    def _forward(self, head, xs, cs, idx, dev):
        """Class probabilities of bags ``idx`` (batched by similar size), as a torch tensor."""

        idx = np.asarray(idx)
        sizes = np.array([xs[i].shape[0] for i in idx])
        out = torch.empty(len(idx), head.n_classes, device=dev)
        order = np.argsort(sizes, kind="stable")
        for s in range(0, len(order), self.batch_size):
            sel = order[s:s + self.batch_size]
            x, m, c = self._collate(xs, cs, idx[sel], dev)
            out[torch.as_tensor(sel, device=dev)] = torch.softmax(
                head(x, mask=m, coords=c).logits.float(), dim=-1)
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "head_"):
            raise NotFittedError(
                "this MILClassifier is not fitted yet; call fit(bags, y) before predicting."
            )

    def predict_proba(self, bags: Any, *, coords: Sequence[Any] | None = None,
                      slide_ids: Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``.

        Shape:
            returns ``(n_bags, n_classes)`` float32.
        """

        self._check_fitted()
        xs, cs = self._load(bags, coords, slide_ids, self.n_features_in_)
        if self.head_.uses_coords and cs is None:
            raise InputError(f"head {self.head!r} needs coords=[(n_i, 2), ...] for prediction.")
        with torch.no_grad():
            p = self._forward(self.head_, xs, cs, np.arange(len(xs)), self.device_)
        return p.cpu().numpy().astype(np.float32)

    def predict(self, bags: Any, *, coords: Sequence[Any] | None = None,
                slide_ids: Sequence[str] | None = None) -> np.ndarray:
        """The most probable class label of each bag, shape ``(n_bags,)``."""
        p = self.predict_proba(bags, coords=coords, slide_ids=slide_ids)
        return self.classes_[p.argmax(axis=1)]

    def _one_bag(self, bag: Any, coords: Any | None, what: str) -> tuple[Any, Any]:
        """One bag ``(n, D)`` (and its ``(n, 2)`` grid coords), checked and standardised, as
        ``(1, n, D)`` / ``(1, n, 2)`` tensors on the model's device."""
        self._check_fitted()
        xs, cs = self._load([bag], None if coords is None else [coords], None,
                            self.n_features_in_)
        if self.head_.uses_coords and cs is None:
            raise InputError(f"head {self.head!r} needs coords=(n, 2) for {what}().")
        x, _, c = self._collate(xs, cs, np.array([0]), self.device_)
        return x, c

    def attention(self, bag: Any, *, coords: Any | None = None) -> np.ndarray:
        """Per-tile attention weights of one bag (the head's ``MILOutput.attention``), for heads
        that pool with attention (``abmil``, ``gated_abmil``, ``dsmil``, ``transmil``,
        ``sparseconv`` with ``pooling="attention"``).

        Args:
            bag: the bag's tile features (standardised like in training).
            coords: the tiles' grid positions (coordinate-aware heads; used by heads that read
                them).

        Shape:
            bag ``(n, D)``, coords ``(n, 2)`` -> ``(n,)`` float32 weights summing to 1.

        Raises:
            NotFittedError: before ``fit``.
            ConfigError: the head pools without attention (``mean``, ``max``, ``resmlp_mean``,
                ``sparseconv`` with mean/max pooling); the message names the heads with it.
        """
        self._check_fitted()
        require_attention(self.head_, "MILClassifier", self.head)
        x, c = self._one_bag(bag, coords, "attention")
        with torch.no_grad():
            att = self.head_(x, mask=None, coords=c).attention
        return att[0].cpu().numpy().astype(np.float32)

    def tile_scores(self, bag: Any, *, coords: Any | None = None,
                    target_class: Any = None) -> np.ndarray:
        """Each tile of one bag classified alone (a bag of one tile): the log-odds of
        ``target_class`` against the other classes, ``log p_t - log sum_{c != t} p_c``. Works
        with every head.

        Args:
            bag: the bag's tile features.
            coords: the tiles' grid positions (coordinate-aware heads).
            target_class: one of ``classes_`` (default the last, e.g. ``1``).

        Shape:
            bag ``(n, D)``, coords ``(n, 2)`` -> ``(n,)`` float32 log-odds.

        Raises:
            NotFittedError: before ``fit``.
            ConfigError: ``target_class`` is not one of ``classes_``.
        """
        self._check_fitted()
        classes = list(self.classes_)
        target = classes[-1] if target_class is None else target_class
        if target not in classes:
            raise ConfigError(f"target_class={target_class!r} is not one of the classifier's "
                              f"classes: {', '.join(map(str, classes))}.")
        col = classes.index(target)
        x, c = self._one_bag(bag, coords, "tile_scores")
        x, c = x[0, :, None], None if c is None else c[0, :, None]  # n bags of one tile
        parts = []
        with torch.no_grad():
            for s in range(0, len(x), _TILE_CHUNK):
                lg = self.head_(x[s:s + _TILE_CHUNK], mask=None,
                                coords=None if c is None else c[s:s + _TILE_CHUNK]).logits
                lp = torch.log_softmax(lg.double(), dim=-1)
                rest = torch.logsumexp(torch.cat([lp[:, :col], lp[:, col + 1:]], 1), dim=1)
                parts.append((lp[:, col] - rest).cpu().numpy())
        return np.concatenate(parts).astype(np.float32)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (head weights, standardisation) and ``config.json``
        (parameters, classes, history) into directory ``path``; :meth:`load` reads them back."""
        self._check_fitted()
        tensors = {f"head.{k}": v for k, v in self.head_.state_dict().items()}
        tensors |= {"mean_": _as_tensor(self.mean_), "scale_": _as_tensor(self.scale_)}
        return save_estimator(path, format=_FORMAT, params=self.get_params(deep=False),
                              tensors=tensors, state={
            "classes": self.classes_.tolist(), "classes_dtype": self.classes_.dtype.str,
            "n_features_in": self.n_features_in_, "history": self.history_,
            "best_epoch": self.best_epoch_,
            "validation_indices": self.validation_indices_.tolist()})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> MILClassifier:
        """Load a classifier written by :meth:`save` (``device`` overrides the saved one)."""
        path = Path(path)
        cfg, tensors = load_estimator(path, format=_FORMAT, owner="MILClassifier",
                                      hint="write one with MILClassifier.save()")
        params = dict(cfg["params"])
        if device is not None:
            params["device"] = device
        model = cls(**params)
        model.classes_ = np.array(cfg["classes"], dtype=np.dtype(cfg["classes_dtype"]))
        model.n_features_in_ = int(cfg["n_features_in"])
        model.mean_ = tensors.pop("mean_").numpy()
        model.scale_ = tensors.pop("scale_").numpy()
        model.device_ = resolve_device(model.device)
        head = create_head(model.head, model.n_features_in_, n_classes=len(model.classes_),
                           embed_dim=model.embed_dim, dropout=model.dropout,
                           **(model.head_kwargs or {}))
        try:
            head.load_state_dict({k[len("head."):]: v for k, v in tensors.items()}, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"weights in '{path / MODEL_FILE}' do not fit the configured "
                               f"head: {err}") from err
        model.head_ = head.to(model.device_).eval()
        model.history_ = list(cfg["history"])
        model.n_epochs_ = len(model.history_)
        model.best_epoch_ = int(cfg["best_epoch"])
        model.validation_indices_ = np.asarray(cfg["validation_indices"], dtype=np.int64)
        return model


def _as_tensor(a: np.ndarray) -> Any:

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
