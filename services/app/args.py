"""The app's arguments: one pydantic model validates what `serve run`, a serve config's
``args`` and the tests pass to ``build_app``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.eagle_relay import DEFAULT_WINDOW
from ..core.speculation_cache import MAX_FANOUT
from ..models.loading import ModelPaths, resolve_paths

# Custom resources that pin each deployment to its node group. `outrider serve` and the
# KubeRay worker groups give each node role one of these.
GATEWAY_RESOURCE = "outrider_gateway"
DRAFTER_RESOURCE = "outrider_drafter"
VERIFIER_RESOURCE = "outrider_verifier"
ROLE_RESOURCES = (GATEWAY_RESOURCE, DRAFTER_RESOURCE, VERIFIER_RESOURCE)


class Autoscaling(BaseModel):
    """Serve autoscaling of one deployment (its ``autoscaling_config``); each scales on
    its own load (app/autoscaling.py)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    # Load per replica to hold: sessions for every deployment (a gateway's or verifier's
    # ongoing streams, a draft worker's open draft streams). None: the deployment's
    # default, where its throughput stops growing with sessions (AppArgs.serve_options).
    target: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class Placement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)  # fixed; ignored with autoscaling
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    torch_threads: int = Field(1, ge=1)  # set in the replica's process

    def actor_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


class EagleArgs(BaseModel):
    """An EAGLE-3 drafter (published layout) and where it drafts."""

    model_config = ConfigDict(extra="forbid")

    # Folder or hub id; unset = the one beside the target (<target>-eagle), if there.
    path: str | None = None
    # "verifier": drafted in the verifier process from the features of the pass just run.
    # "drafter": on the draft workers; the verifier fuses the target's features and sends
    # each round's with its outcome (core/eagle_relay.py), and the worker drafts the next
    # round while this one verifies.
    placement: Literal["verifier", "drafter"] = "verifier"
    # Placement "drafter": the features' type on the wire (bfloat16: half the bytes;
    # float32: what the verifier placement drafts from, bit for bit, on a float32 target),
    # and how many positions' a verifier keeps per session, for a stream reopened on
    # another worker (a longer text is drafted from its last window).
    feature_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    feature_window: int = Field(DEFAULT_WINDOW, ge=16)


class RankPlacement(BaseModel):
    """Each rank of a tensor-parallel verifier replica; on CUDA each also gets one GPU."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Model folders or hub ids; unset = the pair bundled with the package.
    target: str | None = None
    draft: str | None = None
    # Medusa heads for the target (folder or hub id); unset = those beside the target
    # (<target>-medusa, as `outrider build-heads` saves them), if there. The verifiers
    # load them and serve SPECULATION_METHOD_MEDUSA.
    medusa: str | None = None
    # MTP modules (folder or hub id); unset = those beside the target (<target>-mtp), else
    # the target's own checkpoint if it ships them (DeepSeek-V3, GLM-4.5, Qwen3-Next
    # layouts). The verifiers load them and serve SPECULATION_METHOD_MTP.
    mtp: str | None = None
    # The verifiers load it and serve SPECULATION_METHOD_EAGLE.
    eagle: EagleArgs = Field(default_factory=EagleArgs)
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["default", "auto", "float32", "bfloat16", "float16"] = "default"
    trust_remote_code: bool = False

    # Request defaults and limits.
    default_method: Literal["draft", "ngram", "suffix", "none"] = "draft"
    default_gamma: int = Field(8, ge=1, le=16)
    # The speculation cache: while a round verifies, each draft worker session drafts the
    # next block for up to this many likely outcomes of it (1: plain pipelining's one).
    # Workers draft fewer where their measured steps say extra rows are not nearly free
    # (a CPU that runs the verifier too) and under load.
    default_fanout: int = Field(8, ge=1, le=MAX_FANOUT)
    # "requested": every session drafts the branches it asks for (to measure the cache
    # itself; where drafting is not free, that costs the verifier).
    fanout_policy: Literal["measured", "requested"] = "measured"
    # "measured": each verifier replica's goodput controller (core/goodput.py) plans every
    # session's gamma, down to none where drafting would not pay; a request's gamma is
    # its ceiling. "requested": every round drafts the gamma the request asks for, paid
    # or not (to measure speculation itself, or drafting where this replica's timings
    # say it loses).
    gamma_policy: Literal["measured", "requested"] = "measured"
    # Draft workers end a draft early when the draft model's probability of its own
    # token falls below this (0 = never): shorter blocks that are more often accepted
    # whole, which is what lets a pipelined early block be used.
    confidence_stop: float = Field(0.0, ge=0, lt=1)
    default_max_new_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(2048, ge=1)
    max_sessions: int = Field(64, ge=1)  # per gateway replica; beyond it RESOURCE_EXHAUSTED
    max_prompt_tokens: int = Field(0, ge=0)  # beyond it INVALID_ARGUMENT; 0: what the context leaves room for
    # Concurrent sessions of one client address per gateway replica; beyond it
    # RESOURCE_EXHAUSTED (0: no limit beneath max_sessions).
    max_sessions_per_client: int = Field(0, ge=0)
    max_samples: int = Field(8, ge=1)  # n per request; each sample is a session
    # The model's name in the OpenAI-compatible API (/v1/models; requests naming another get 404).
    served_model_name: str = "outrider"
    # Rounds of concurrent sessions verified together in one forward pass, at most
    # this many (1 = each session verified on its own).
    max_batch_size: int = Field(16, ge=1)
    # Sessions a verifier replica runs at once (Serve's max_ongoing_requests for it);
    # as many more wait in a queue at each gateway, and beyond that are refused with
    # RESOURCE_EXHAUSTED. 0: four full batches, 4 x max_batch_size; each pass takes
    # max_batch_size rounds, so a session among four batches' worth waits three passes
    # a round, and more would only stretch every session's time per token.
    verifier_max_sessions: int = Field(0, ge=0)
    # Draft streams a draft worker admits; a stream beyond it is refused at once and its
    # session drafts on another worker or decodes alone. 0: 2 x max_batch_size; one
    # batched draft step serves max_batch_size sessions, and at twice that every
    # session waits a step per token, so drafting no longer hides under verification.
    drafter_max_sessions: int = Field(0, ge=0)
    # Each verifier replica (each tensor-parallel rank: its shard) preallocates this
    # much for the target's KV (core/kv_pool.py); a session holds prompt + max_new_tokens
    # + 17 positions of it from admission to its end, and one that does not fit is
    # refused with RESOURCE_EXHAUSTED.
    kv_cache_bytes: int = Field(2 * 2**30, ge=2**20)
    # Each draft worker preallocates this much for the draft model's KV, shared by its
    # sessions and their speculation-cache branches (core/paged_kv.py); a stream it
    # cannot hold is refused, and its session drafts on another worker or decodes alone.
    draft_kv_cache_bytes: int = Field(2**30, ge=2**20)

    # Each verifier replica drives a tensor-parallel group of this many ranks (Ray
    # actors in the replica's placement group); draft workers keep their own parallelism.
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    verifier_rank: RankPlacement = Field(default_factory=RankPlacement)
    drafter_port: int = Field(0, ge=0, le=65535)  # the Drafter gRPC port on draft workers; 0 = any free

    # Session state in the object store (services/state/): draft KV chunks per session,
    # so any draft replica continues any session, and shared prefix KV blocks, so any
    # verifier replica reuses a prefill another one computed.
    session_state: bool = True
    draft_chunk_tokens: int = Field(32, ge=1)  # a drafter saves a chunk once this many committed positions are new
    prefix_block_tokens: int = Field(64, ge=1)  # shared prefixes are matched in blocks of this many tokens
    prefix_cache_bytes: int = Field(64 * 2**20, ge=0)  # shared prefix KV kept on the head (least recently used first out)
    # KV chunks each replica keeps of what it saved or fetched (least recently used first
    # out): a replica's memory grows by this much under load before it levels off.
    replica_cache_bytes: int = Field(64 * 2**20, ge=0)
    session_idle_s: float = Field(600.0, gt=0)  # a session's state is dropped after this long unused
    # A stream whose verifier or draft replica dies continues on another one from its
    # committed tokens, at most this many times.
    max_resumes: int = Field(8, ge=0)

    gateway: Placement = Field(default_factory=lambda: Placement(resources={GATEWAY_RESOURCE: 1}))
    drafter: Placement = Field(default_factory=lambda: Placement(num_cpus=1, resources={DRAFTER_RESOURCE: 1}))
    verifier: Placement = Field(
        # One torch thread: on CPU the draft worker drafts on the other core meanwhile.
        default_factory=lambda: Placement(num_cpus=1, resources={VERIFIER_RESOURCE: 1})
    )

    @model_validator(mode="after")
    def _gpus_for_cuda(self) -> "AppArgs":
        if self.device == "cuda" and self.tensor_parallel_size == 1 and self.verifier.num_gpus < 1:
            raise ValueError("device 'cuda' needs verifier.num_gpus >= 1 (tensor-parallel ranks get a GPU each)")
        if self.device == "cuda" and self.drafter.num_gpus <= 0:
            raise ValueError("device 'cuda' needs drafter.num_gpus > 0 (a fraction shares a GPU)")
        return self

    def verifier_bundles(self) -> list[dict[str, float]] | None:
        """Placement-group bundles of a tensor-parallel verifier replica: the replica's
        own, then one per rank; None without tensor parallelism."""
        if self.tensor_parallel_size == 1:
            return None
        replica = {"CPU": self.verifier.num_cpus, "GPU": self.verifier.num_gpus, **self.verifier.resources}
        rank = {"CPU": self.verifier_rank.num_cpus, "GPU": 1.0 if self.device == "cuda" else 0.0}
        nonzero = lambda bundle: {k: v for k, v in bundle.items() if v}  # noqa: E731
        return [nonzero(replica)] + [nonzero(rank)] * self.tensor_parallel_size

    def node_demand(self) -> dict[str, dict[str, float]]:
        """What each node role must offer for every replica to be placed, by the role
        resource each deployment names: {role resource: {"CPU": n, "GPU": n, ...}}.
        A tensor-parallel verifier replica needs its whole placement group on one node."""
        demand: dict[str, dict[str, float]] = {}
        for placement, bundles in ((self.gateway, None), (self.drafter, None), (self.verifier, self.verifier_bundles())):
            role = next((r for r in ROLE_RESOURCES if r in placement.resources), GATEWAY_RESOURCE)
            per_replica = bundles or [{"CPU": placement.num_cpus, "GPU": placement.num_gpus}]
            need = demand.setdefault(role, {"CPU": 0.0, "GPU": 0.0})
            for bundle in per_replica:
                replicas = placement.autoscaling.max_replicas if placement.autoscaling else placement.num_replicas
                for resource, amount in bundle.items():
                    if resource in ("CPU", "GPU"):
                        need[resource] += amount * replicas
        return demand

    def session_limits(self) -> dict[str, int]:
        """Sessions each replica admits: {"gateway", "verifier", "drafter"}."""
        return {"gateway": self.max_sessions,
                "verifier": self.verifier_max_sessions or 4 * self.max_batch_size,
                "drafter": self.drafter_max_sessions or 2 * self.max_batch_size}

    def serve_options(self, role: str) -> dict:
        """Serve deployment options of ``role`` (gateway, verifier, drafter): replicas,
        fixed or autoscaled, and its admission limits."""
        from .autoscaling import POLICY

        placement = {"gateway": self.gateway, "verifier": self.verifier, "drafter": self.drafter}[role]
        limit = self.session_limits()[role]
        options: dict = {"ray_actor_options": placement.actor_options()}
        if role == "gateway":
            # Twice its session limit, so that requests reach its own admission check (a
            # reason and a retry hint) rather than queue; a bounded queue past that.
            options.update(max_ongoing_requests=2 * limit, max_queued_requests=limit)
        elif role == "verifier":
            # A bounded queue at each gateway, then RESOURCE_EXHAUSTED. Serve counts a
            # request as queued while it is being routed, so a burst of new sessions
            # queues for a moment: a queue shorter than a replica's limit refuses bursts
            # that would fit.
            options.update(max_ongoing_requests=limit, max_queued_requests=limit)
        else:
            options.update(max_ongoing_requests=16)  # endpoint() calls: instant; streams are admitted on gRPC
        scaling = placement.autoscaling
        if scaling is None:
            options["num_replicas"] = placement.num_replicas
            return options
        # The default target: where a replica's throughput stops growing with sessions.
        # Gateway: half its session limit, to add a replica before it refuses requests.
        # Verifier: one full batch; more sessions wait whole passes. Draft worker: one
        # full batched draft step.
        default = {"gateway": limit / 2, "verifier": self.max_batch_size, "drafter": self.max_batch_size}[role]
        config = {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                  "target_ongoing_requests": scaling.target or default,
                  "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
                  "look_back_period_s": scaling.look_back_period_s}
        if role == "drafter":
            config["policy"] = {"policy_function": POLICY}
        options["autoscaling_config"] = config
        return options

    @property
    def paths(self) -> ModelPaths:
        return resolve_paths(self.target, self.draft, self.medusa, self.mtp, self.eagle.path)

    def head_methods(self) -> dict[str, str | None]:
        """Methods drafted on the verifier: None where served, else why not."""
        from ..models.mtp import ships_mtp

        paths = self.paths
        why = {}
        for kind, name, found in (("medusa", "Medusa heads", paths.medusa is not None),
                                  ("mtp", "MTP modules", paths.mtp is not None or ships_mtp(paths.target)),
                                  ("eagle", "an EAGLE-3 drafter", paths.eagle is not None)):
            if not found:
                setting = "eagle.path" if kind == "eagle" else kind
                why[kind] = f"no {name} for {paths.target} (set {setting}, or run `outrider build-heads --kind {kind}`)"
            elif self.tensor_parallel_size > 1:
                why[kind] = f"drafting with {name} needs the target's hidden states, which a tensor-parallel verifier does not return yet"
            else:
                why[kind] = None
        return why
