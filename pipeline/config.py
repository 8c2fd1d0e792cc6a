"""One typed configuration for every job: loaded from YAML and/or `section.field=value` overrides,
validated before any work starts so a typo fails in a second, not after an hour of encoding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

EMBEDDED_MODEL = "icar-tiny-vit"
MODELS_DIR = Path(__file__).resolve().parent / "models"  # shipped, read-only: configs, weights, routes


# a dataset name never holds '/', so in an id the first '/' always ends it (read.row_id)
DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    """Where the shards are and how their columns map onto the pipeline's names."""

    paths: list[str] = Field(default_factory=list, description="fsspec URLs or globs of parquet shards")
    dataset: str | None = Field(
        None,
        pattern=DATASET_NAME,
        description="name of the collection the shards belong to; a shard is identified by this name plus "
        "its path relative to the input root, never by where it is read from. None: the input is the "
        "table's one unnamed collection (a shard is named by its relative path alone); set it when several "
        "collections share a table",
    )
    image_column: str | None = Field(
        None, description="image bytes column; None = first of jpg/png/webp/image"
    )
    key_column: str = Field("key", description="column with each row's key (unique within its shard)")
    url_column: str = Field("url", description="column with the image's source URL, stored with the row")
    caption_column: str = Field("caption", description="column with the caption (text search, page)")
    status_column: str = Field(
        "status", description="img2dataset download status; rows not `success` are rejected as skipped"
    )
    aliases: dict[str, str] = Field(
        default_factory=lambda: {"URL": "url", "TEXT": "caption", "SAMPLE_ID": "key"},
        description="source column -> pipeline column, applied when the pipeline's own name is absent",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (s3 endpoint…)")
    max_text_bytes: int = Field(
        65_536, gt=0, description="a longer key, url or caption fails its row (stored cut to this length)"
    )


class DecodeConfig(_Section):
    """How CPU workers turn image bytes into the model's input pixels."""

    max_pixels: int = Field(64_000_000, gt=0, description="refuse images whose header claims more pixels")
    use_draft: bool = Field(True, description="let libjpeg decode at a reduced scale when the image is large")


class RouteSpec(_Section):
    """A compute route: how deep the ViT runs and how it reduces tokens, as one of four kinds told apart by
    the fields a route sets (so routes files stay flat): `ExitRoute` (no reduction), `MergeRoute`,
    `PruneRoute` and `TwoPhaseRoute`. `RouteSpec(**fields)` builds the kind its fields name, as `Path()`
    builds a `PosixPath`; a field of another kind is refused, one left at the value meaning "off"
    (`merge: none`, `merge_r: 0`, `late_after: 0`, null, …) is ignored."""

    kind: ClassVar[str]
    name: str = Field(description="the route's name in summaries, rows (`route` column) and reports")
    exit_depth: int | None = Field(None, ge=1, description="blocks to run; None = full depth")
    tuned: bool = Field(
        False,
        description="run the last blocks with weights tuned for this token path (the heads file's tuned "
        "tails: jobs/train_tails.py); full depth, merging only",
    )

    def __new__(cls, **fields: Any) -> RouteSpec:
        return super().__new__(_ROUTE_KINDS[route_kind(fields)] if cls is RouteSpec else cls)

    @model_validator(mode="before")
    @classmethod
    def _drop_off_values(cls, data: Any) -> Any:
        return _set_fields(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _tuned_needs_full_depth_merging(self) -> RouteSpec:
        if self.tuned and not self.tunable:
            raise ValueError(
                f"route {self.name!r}: tuned tails serve full-depth routes that merge tokens, without "
                "pruning or a per-image split"
            )
        return self

    @property
    def tunable(self) -> bool:
        """Whether a tuned tail can serve this route's token path."""
        return False

    def merge_count(self, tokens: int, late: bool = False) -> int:
        """Tokens to merge away in a block that holds `tokens` (the matcher may clip it further); `late`:
        the block is at or past `late_after` on an image that switched to `late_keep`."""
        return 0

    @property
    def splits(self) -> bool:
        """Whether images choose their own schedule at `late_after` (so the batch splits in two groups)."""
        return False

    @property
    def prunes(self) -> bool:
        return False


class ExitRoute(RouteSpec):
    """Every token through `exit_depth` blocks (or all of them), read by that depth's exit head."""

    kind: ClassVar[str] = "exit"


class MergeRoute(RouteSpec):
    """Tokens merged between attention and MLP in every block (ToMe / CrossGET): `merge_r` per block, or
    the fraction `merge_keep` kept per block down to `merge_floor`."""

    kind: ClassVar[str] = "merge"
    merge: Literal["tome", "crossget"] = Field(description="token merging after attention")
    merge_r: int | None = Field(None, ge=1, description="tokens merged away per block (ToMe's constant r)")
    merge_keep: float | None = Field(
        None, ge=0.5, lt=1, description="instead of merge_r: fraction of tokens each block keeps"
    )
    merge_floor: int = Field(
        0, ge=0, description="blocks holding this many tokens (CLS included) or fewer merge nothing"
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> MergeRoute:
        if (self.merge_r is None) == (self.merge_keep is None):
            raise ValueError(
                f"route {self.name!r}: merge={self.merge!r} needs exactly one of merge_r > 0 or merge_keep"
            )
        return self

    @property
    def tunable(self) -> bool:
        return self.exit_depth is None

    def _kept_fraction(self, late: bool) -> float | None:
        return self.merge_keep

    def merge_count(self, tokens: int, late: bool = False) -> int:
        """A front-loaded schedule (`merge_keep` with a floor) merges most where tokens are many and
        redundant and stops before the few last tokens collapse; on the embedded model it beats a constant
        r by a wide margin at equal FLOPs."""
        keep = self._kept_fraction(late)
        r = self.merge_r if keep is None else tokens - math.ceil(tokens * keep)
        return max(0, min(r, tokens - self.merge_floor))


class TwoPhaseRoute(MergeRoute):
    """A `merge_keep` schedule that keeps `late_keep` instead from block `late_after` on: gentle in the
    first blocks, harder after them, which on the embedded model beats one fraction at equal GFLOPs
    (results/frontier.md). With `late_similarity`, each image takes the late phase only if its tokens are
    alike enough, and the batch runs on as two dense groups."""

    kind: ClassVar[str] = "two-phase"
    merge_keep: float = Field(ge=0.5, lt=1, description="fraction of tokens each block keeps at first")
    late_keep: float = Field(ge=0.5, lt=1, description="from block late_after on, the fraction kept instead")
    late_after: int = Field(ge=1, description="blocks that keep merge_keep before late_keep takes over")
    late_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="per image: only images whose late merges would pair tokens at least this alike "
        "(cosine of keys at block late_after) switch to late_keep; None = every image switches",
    )

    @property
    def tunable(self) -> bool:
        return self.exit_depth is None and not self.splits

    def _kept_fraction(self, late: bool) -> float | None:
        return self.late_keep if late else self.merge_keep

    @property
    def splits(self) -> bool:
        return self.late_similarity is not None


class PruneRoute(RouteSpec):
    """After `prune_after` blocks, each image keeps its `energy_tau` spectral-energy budget of tokens (or
    `keep_tokens`), the dropped ones fused into one token."""

    kind: ClassVar[str] = "prune"
    energy_tau: float | None = Field(
        None, gt=0, le=1, description="keep the fewest tokens holding this fraction of spectral energy"
    )
    keep_tokens: int | None = Field(None, ge=1, description="fixed number of patch tokens kept")
    prune_after: int = Field(1, ge=1, description="blocks run on all tokens before energy/fixed pruning")

    @model_validator(mode="after")
    def _one_budget(self) -> PruneRoute:
        if (self.energy_tau is None) == (self.keep_tokens is None):
            both = ", not both" if self.energy_tau is not None else ""
            raise ValueError(f"route {self.name!r}: set energy_tau or keep_tokens{both}")
        return self

    @property
    def prunes(self) -> bool:
        return True


_ROUTE_KINDS: dict[str, type[RouteSpec]] = {
    k.kind: k for k in (ExitRoute, MergeRoute, TwoPhaseRoute, PruneRoute)
}
# the values that mean a reduction is off: a route setting one is read as not setting it
_OFF_VALUES: dict[str, Any] = dict(
    merge="none", merge_r=0, merge_floor=0, prune_after=1, late_after=0, tuned=False
)


def _set_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a route mapping really sets: None and the values meaning "off" dropped."""
    return {k: v for k, v in fields.items() if v is not None and _OFF_VALUES.get(k, ...) != v}


def route_kind(fields: Any) -> str:
    """The kind of route a mapping (or route) describes, from the reductions its fields set."""
    if isinstance(fields, RouteSpec):
        return fields.kind
    given = _set_fields(fields).keys() if isinstance(fields, dict) else set()
    if given & {"late_keep", "late_after", "late_similarity"}:
        return "two-phase"
    if given & {"energy_tau", "keep_tokens", "prune_after"}:
        return "prune"
    if given & {"merge", "merge_r", "merge_keep", "merge_floor"}:
        return "merge"
    return "exit"


Route = Annotated[
    Annotated[ExitRoute, Tag("exit")]
    | Annotated[MergeRoute, Tag("merge")]
    | Annotated[TwoPhaseRoute, Tag("two-phase")]
    | Annotated[PruneRoute, Tag("prune")],
    Discriminator(route_kind),
]


def _default_routes() -> list[RouteSpec]:
    return [RouteSpec(name="full")]


class RouterConfig(_Section):
    """Complexity thresholds (ascending) split images over routes: score < thresholds[i] -> routes[i]."""

    scorer: str = Field("handcrafted", description="'handcrafted' or a learned scorer JSON from calibration")
    thresholds: list[float] = Field(
        default_factory=list, description="ascending complexity scores between consecutive routes"
    )
    routes: list[Route] = Field(
        default_factory=_default_routes,
        description="one more than thresholds; with no router section, the model's shipped routes "
        "(pipeline/models/<name>.routes.yaml) or one full-depth route",
    )

    @model_validator(mode="after")
    def _routes_match_thresholds(self) -> RouterConfig:
        if len(self.routes) != len(self.thresholds) + 1:
            raise ValueError(
                f"router needs len(routes) == len(thresholds) + 1, got {len(self.routes)} routes and "
                f"{len(self.thresholds)} thresholds"
            )
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError(f"router.thresholds must be strictly ascending, got {self.thresholds}")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError(f"router.routes names must be unique, got {names}")
        return self


class ModelConfig(_Section):
    """Any open_clip model: a registered name plus a pretrained tag or a local checkpoint path."""

    name: str = Field(EMBEDDED_MODEL, description="open_clip model name (ViT towers only)")
    pretrained: str | None = Field(None, description="open_clip tag or checkpoint path; None = embedded")
    heads: str | None = Field(None, description="exit-heads file trained for this model")

    @property
    def model_id(self) -> str:
        """Identity written with every row: embeddings from different model ids never mix silently."""
        return f"{self.name}:{self.pretrained or 'embedded'}"


class EncoderConfig(_Section):
    """The encoder actors: how many, on what, with what batches."""

    batch_size: int = Field(64, gt=0, description="rows per encoder batch (split by route inside)")
    actors: int | None = Field(
        None,
        ge=1,
        description="encoder actors; None = one per GPU of the cluster (gpus_per_actor > 0), else one per "
        "cpus_per_actor CPUs",
    )
    gpus_per_actor: float = Field(0.0, ge=0, description="0 on CPU clusters, 1 per actor on GPU clusters")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each encoder actor")
    torch_threads: int = Field(0, ge=0, description="torch threads per actor; 0 = cpus_per_actor")
    max_restarts: int = Field(
        3,
        ge=0,
        description="times a batch is retried after the process running it died (the process itself is "
        "restarted each time) before its shards fail; Ray Data's own default retries forever",
    )


class OutputConfig(_Section):
    """Where the vectors go and how the writer commits them."""

    uri: str = Field(".demo/lancedb", description="LanceDB directory or s3:// URI")
    table: str = Field(
        "images",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="the alias queries use; its rows, rejected rows and manifest live in tables named "
        "after it",
    )
    vector_dtype: Literal["float16", "float32"] = Field(
        "float32", description="stored embedding type; float16 halves the vectors (recall: docs/search.md)"
    )
    storage_options: dict[str, str] = Field(default_factory=dict, description="LanceDB object-store options")
    commit_shards: int = Field(
        64, gt=0, description="written shards made visible per commit round (one Lance commit per table)"
    )
    commit_seconds: float = Field(
        30.0, gt=0, description="a round commits sooner once its oldest written shard has waited this long"
    )
    rows_per_fragment: int = Field(
        1 << 20, gt=0, description="most rows per Lance fragment file, as workers write and compaction merges"
    )
    compact_fragments: int = Field(
        256,
        gt=0,
        description="fragments appended to a table between two compactions during a run (each commit "
        "rewrites the list of every fragment: compaction keeps that list, and the commit's cost, flat)",
    )
    thumbnail_side: int = Field(
        128, ge=0, le=1024, description="longest side of the WebP thumbnail stored with each row; 0 = none"
    )
    lease_seconds: float = Field(
        600.0,
        gt=0,
        description="a crashed job's hold on the table expires after this long (renewed while alive)",
    )
    commit_attempts: int = Field(
        5,
        ge=1,
        description="tries of each LanceDB commit that fails on a transient object-store error (connection "
        "reset or refused, timeout, 5xx, SlowDown) before the job stops; other errors are never retried",
    )
    commit_backoff_seconds: float = Field(
        1.0,
        ge=0,
        description="wait before a commit's second try, doubled for each later one (5 tries: 1+2+4+8 s, "
        "with Lance's own request retries an outage of about 25 s)",
    )

    @property
    def rejected_table(self) -> str:
        """The alias's rejected rows: every alias owns its three tables, none shares state with another."""
        return f"{self.table}_rejected"

    @property
    def manifest_table(self) -> str:
        return f"{self.table}_manifest"


class RayConfig(_Section):
    """Which Ray runs the job and how work is cut into tasks."""

    address: str | None = Field(None, description="Ray cluster address; None = start an embedded local Ray")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded Ray (ignored with address)")
    decode_batch_size: int = Field(256, gt=0, description="rows per decode/score batch")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each decode/score task")
    task_rows: int = Field(
        1024,
        gt=0,
        description="most rows per Ray task: row groups smaller than this are bundled (a task's fixed cost "
        "is then paid per bundle, not per tiny shard; the last tasks of a run are smaller); a task whose "
        "worker dies fails its bundle's shards",
    )


class ReindexConfig(_Section):
    """`icar reindex`: what the nightly run may delete and how it maintains the table afterwards."""

    delete_removed: bool = Field(True, description="delete the rows of shards no longer in the input")
    max_removed_share: float = Field(
        0.5, ge=0, le=1, description="refuse to delete more than this share of the indexed shards at once"
    )
    cleanup_older_than_days: float = Field(
        7.0, ge=0, description="table versions kept for readers and time travel; older ones are pruned"
    )
    rebuild_unindexed_share: float = Field(
        0.2, ge=0, le=1, description="rebuild the vector index (else fold new rows in) past this share"
    )
    report_dir: str | None = Field(
        None, description="where run reports go (JSON + markdown); None = <output.uri>/_reports"
    )


class QueryConfig(_Section):
    """Search settings: `icar build-index` tunes them on the table itself and stores them with it."""

    target_recall: float = Field(
        0.95,
        gt=0,
        le=1,
        description="recall@10 (95% lower confidence bound) the cheapest (nprobes, refine_factor) must reach "
        "on queries made from the table's own rows, each moved off by the median nearest-neighbour distance",
    )
    tuning_queries: int = Field(
        200, gt=0, description="rows drawn (then perturbed) as tuning queries, each with its own row excluded"
    )


class ServeConfig(_Section):
    """`icar serve`: the HTTP search API and page over the output table."""

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to listen on every interface")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    max_upload_bytes: int = Field(10 * 2**20, gt=0, description="larger query images get 413")
    max_query_pixels: int = Field(
        25_000_000, gt=0, description="query images whose header claims more pixels are refused"
    )
    max_k: int = Field(100, gt=0, description="most results one request may ask for (k + offset)")
    refresh_seconds: float = Field(
        5.0, gt=0, description="how often the table is checked for new versions (a reindex's commits)"
    )
    token: SecretStr | None = Field(
        None,
        description="bearer token every API request must carry (Authorization: Bearer ...); None reads "
        "$ICAR_SERVE_TOKEN. Required unless host is loopback: `icar serve` refuses to start without one",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"],
        min_length=1,
        description="Host header names answered (DNS rebinding defence): exact names, '*.example.com' "
        "for subdomains, or '*' for any (only behind a proxy that checks Host itself)",
    )
    max_body_bytes: int = Field(
        2**20, gt=0, description="larger request bodies (other than image uploads) get 413; chunked ones too"
    )
    max_concurrent_requests: int = Field(
        16, gt=0, description="requests in progress at once; more are answered 503 at once, not queued"
    )
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="a request not answered in this time gets 503 (its work keeps its slot)"
    )


def shipped_routes_path(model: ModelConfig) -> Path | None:
    """The calibrated router shipped for a model, if any: `models/<name>.routes.yaml`.

    It belongs to the shipped checkpoint and heads, so a model with its own weights or heads gets none."""
    if model.pretrained is not None or model.heads is not None:
        return None
    path = MODELS_DIR / f"{model.name}.routes.yaml"
    return path if path.exists() else None


class IndexConfig(_Section):
    input: InputConfig = Field(default_factory=InputConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    reindex: ReindexConfig = Field(default_factory=ReindexConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_router(cls, data: Any) -> Any:
        """No router section: use the model's shipped calibrated routes (one full-depth route if none)."""
        if not isinstance(data, dict) or "router" in data:
            return data
        model = data.get("model") or {}
        try:
            model = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        except ValidationError:
            return data  # reported, with its field names, by the normal validation
        path = shipped_routes_path(model)
        if path is None:
            return data
        return {**data, "router": yaml.safe_load(path.read_text())["router"]}

    @field_validator("input")
    @classmethod
    def _paths_not_blank(cls, value: InputConfig) -> InputConfig:
        if any(not p.strip() for p in value.paths):
            raise ValueError("input.paths contains an empty path")
        return value


class ConfigError(ValueError):
    """A configuration problem, reported with the offending field's dotted name."""


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(raw) if raw != "" else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> IndexConfig:
    """Read YAML (optional), apply `a.b=value` overrides (values parsed as YAML), validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(tree).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    try:
        return IndexConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
        source = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{source}:\n" + "\n".join(lines)) from None
