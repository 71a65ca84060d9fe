"""How hard to fine-tune, decided from the probe's own evidence (no validation data needed).

The head phase solves the linear probe with cross-validation; its held-out
log-loss, as a share of chance's (log K for K classes), says how much the
frozen features leave to gain. Ren et al. (ICLR 2023) and Tomihari & Sato
(NeurIPS 2024) show that the features move during fine-tuning in proportion
to the head's loss at the start: after a saturated probe there is little to
gain and the pretrained features are mostly perturbed; far from the
pretraining domain (a weak probe) one small rate barely moves them.

`FineTunePhase(policy="auto")` (the default) therefore:

When the phase's `learning_rate`, `epochs` and `layer_decay` are left
unset (explicit settings always run as given), it:

- **skips** fine-tuning when the probe leaves little to gain (held-out
  log-loss under `SATURATED` of log K on every head): the head is kept, the
  log says why and the phase's record holds the decision
  (`record.details["policy"]`);
- otherwise, on an image backbone, runs the **stronger recipe** (`STRONG`: a
  hundred times the rate, 1e-3, about 300 steps, the training images shifted
  at random by up to a tenth of their size);
- otherwise runs the phase as configured (the gentle default: about 100
  steps at 1e-5; on text this is what was measured to gain).

Without the probe's evidence (the heads trained by Adam, a model fitted
elsewhere) the phase runs as configured, and says so.

Measured with `benchmarks/fine_tune_recipes.py` (shares of log K; 2 cores
shared by several jobs, so few seeds):

- demo photographs, MobileNetV2, 3 seeds: 0.002-0.003, head 0.998; the
  gentle fine-tune lost 0.03 (0.964, README): skip.
- textures, VGG16, 3 seeds: 0.008-0.147, head 0.986; the gentle fine-tune
  lost 0.004 on average (issue 24): skip.
- yelp, MiniLM: 0.41; the gentle fine-tune gains (0.866 -> 0.884): run.
- topics, MiniLM: 0.36 (seed 0); the gentle fine-tune gains (+0.010): run.
  Measured again later (issue 24, seed 0): 0.47, head 0.848, gentle 0.845.
- digits, MobileNetV2, 64 px, 3 seeds: 0.36-0.60, head 0.734: gentle
  0.797, 1e-4 for 120 steps 0.863 (0.860, 0.907, 0.823). On seed 0,
  layer-wise decay 0.8 from 3e-4 gave 0.846 and 0.7 from 1e-3 0.830: the
  bottom must move far from ImageNet, at one rate. Issue 24 (accuracy per
  seed 0, 1, 2; phase seconds on 2 busy cores):

  | whole network, cosine        | digits                  | digits5                 | s       |
  |------------------------------|-------------------------|-------------------------|---------|
  | 1e-4, 120 steps (previous)   | 0.863 (0.860 .907 .823) | (0.762 .682 -)          | 40-80   |
  | 1e-4, 300 steps              | seed 0: 0.890           |                         | 136     |
  | 3e-4, 300 steps              | 0.899 (0.910 .930 .857) |                         | 110     |
  | 3e-4, 300 steps, shifts 0.1  | 0.913 (0.926 .922 .892) | 0.867 (0.851 .870 .879) | 125-175 |
  | 1e-3, 300 steps, shifts 0.1  | 0.910 (0.879 .947 .905) | 0.884 (0.878 .893 .880) | 110-180 |

  Also tried: BatchNorm training (momentum 0.9) at 1e-4 for 120 steps, seed
  0: 0.738, barely above the head (not pursued); shifts with 1e-4 for 120 steps: 0.836
  (too few steps for the harder task); on seed 2: 500 steps 0.892 (as 300),
  shifts with a rotation and zoom 0.876, one-cycle 1e-3 with weight decay
  0.01 (seed 0, no shifts) 0.883. Raw pixels and logistic regression: 0.896.
  The rows above start from one head and shift through `fit`'s augmentation;
  the default `fit` itself (`transfer_quality.py`, the phase's own shifts,
  other random draws) gave digits 0.933 (0.933, 0.950, 0.916) in 95 s a seed
  and digits5 0.877 (0.848, 0.883, 0.899) in 112 s (raw pixels: 0.896 and
  0.855): one seed's figure moves by about 0.03 with the random draws alone.

`SATURATED` lies between the textures' highest share (0.15) and the
lowest share where fine-tuning gained (0.41).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import keras

from keras_transfer.training import PhaseRecord, count_params, say

# Held-out log-loss as a share of log K.
SATURATED = 0.25
# The stronger recipe's options (those the user left unset): the far domain's
# features must move far (1e-3 for 300 steps), and its few images gain from shifts.
STRONG = dict(learning_rate=1e-3, min_steps=300, shift=0.1)

_EVIDENCE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def remember_probe(model, head: str, details: dict) -> None:
    """Keeps what the probe found for one head of `model` (the head phase calls it)."""
    _EVIDENCE.setdefault(model, {})[head] = dict(details)


def remember_record(model, record: PhaseRecord) -> None:
    """Keeps the evidence a finished head phase recorded (a phase restored from a backup)."""
    for head, found in record.details.items():
        if isinstance(found, dict) and found.get("solver") == "probe":
            remember_probe(model, head, found)


def forget_probe(model) -> None:
    """Drops the evidence: the heads are about to change by other means."""
    _EVIDENCE.pop(model, None)


def probe_evidence(model) -> dict:
    """`{head: the probe's details}` from the last head phase on `model` ({} if none)."""
    return dict(_EVIDENCE.get(model, {}))


@dataclasses.dataclass(frozen=True)
class Decision:
    """What `decide` chose.

    Attributes:
        action: `"skip"`, `"strong"` or `"as_given"`.
        reason: str. One sentence for the log.
        ratio: float. The largest held-out log-loss over heads, as a share
            of log K (NaN without evidence).
    """

    action: str
    reason: str
    ratio: float = math.nan

    def as_dict(self) -> dict:
        return {"action": self.action, "reason": self.reason,  # None: no evidence
                "held_out_log_loss_share": None if math.isnan(self.ratio) else self.ratio}


def loss_share(details: dict, num_classes: int) -> float:
    """The probe's held-out log-loss as a share of log K (NaN when unknown)."""
    loss = details.get("held_out_log_loss", math.nan)
    if details.get("kind", "classification") == "regression" or num_classes < 2:
        return math.nan
    return float(loss) / math.log(num_classes)


def decide(model, phase) -> Decision:
    """Skip, strengthen or keep a fine-tune phase, from the probe's evidence on `model`.

    Args:
        model: the `TransferModel` (its head phase has run).
        phase: the `FineTunePhase` (its `policy` is `"auto"`).

    Returns:
        A `Decision`.
    """
    given = [k for k in ("learning_rate", "epochs", "layer_decay")
             if getattr(phase, k) is not None]
    if given:
        return Decision("as_given", f"{', '.join(given)} given, so the phase runs as "
                        "configured (policy='auto' decides only the recipe left to it)")
    evidence = probe_evidence(model)
    shares = [loss_share(found, model.head_specs[name].num_classes)
              for name, found in evidence.items() if name in model.head_specs]
    shares = [s for s in shares if not math.isnan(s)]
    if not shares:
        return Decision("as_given", "no probe evidence on this model (the heads were not "
                        "solved by the probe in this session), so the phase runs as "
                        "configured")
    worst = max(shares)
    if worst < SATURATED:
        return Decision("skip", f"the probe is saturated: its cross-validated log-loss is "
                        f"{worst:.3f} of chance's (under {SATURATED}), so fine-tuning has "
                        "little to gain and can lose (the demo: 0.998 -> 0.964); the head "
                        "is kept", worst)
    if _is_image(model):
        return Decision("strong", f"the probe leaves much to gain: its cross-validated "
                        f"log-loss is {worst:.3f} of chance's (over {SATURATED}), so the "
                        f"features must move: {describe(STRONG)}", worst)
    return Decision("as_given", f"the probe's cross-validated log-loss is {worst:.3f} of "
                    "chance's: the phase runs as configured", worst)


def _is_image(model) -> bool:
    return model.backbone.metadata().get("kind") == "image"


def describe(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def strengthened(phase):
    """The phase with the stronger recipe in place of its defaults."""
    return dataclasses.replace(phase, **STRONG, policy="always")


def run_with_policy(phase, model, data, callbacks, initial_epoch, verbose):
    """Runs a `FineTunePhase(policy="auto")`: skipped, strengthened or as configured.

    Returns:
        `(PhaseRecord, keras History)`; `record.details["policy"]` holds the
        `Decision`. A skipped phase has no epochs and leaves the model as it was.
    """
    decision = decide(model, phase)
    say(f"Phase '{phase.name}': {decision.reason}.", verbose)
    if decision.action == "skip":
        history = keras.callbacks.History()
        history.history, history.epoch = {}, []
        trainable, frozen = count_params(model)
        say(f"Phase '{phase.name}' skipped (FineTunePhase(policy='always') runs it anyway).",
            verbose)
        return PhaseRecord(phase.name, initial_epoch, 0, trainable, frozen, None,
                           details={"policy": decision.as_dict()}), history
    chosen = strengthened(phase) if decision.action == "strong" else \
        dataclasses.replace(phase, policy="always")
    record, history = chosen.run(model, data, callbacks, initial_epoch, verbose)
    record.details["policy"] = decision.as_dict()
    return record, history
