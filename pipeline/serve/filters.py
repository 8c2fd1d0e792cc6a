"""Structured result filters -> one Lance filter expression, built by the server.

A client never sends filter text: it sends typed fields, each validated (lengths, counts, finite numbers,
no control characters) and written into the expression as a quoted literal or a number, so no value can
change the expression's shape."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.storage import sql_literal

Text = Annotated[str, Field(min_length=1, max_length=256)]


class Filters(BaseModel):
    """Every field optional; the fields given must all hold (AND)."""

    model_config = ConfigDict(extra="forbid")

    route: list[Text] | None = Field(None, max_length=32, description="route name is one of these")
    exit_depth: list[Annotated[int, Field(ge=0, le=1024)]] | None = Field(None, max_length=64)
    complexity_min: float | None = None
    complexity_max: float | None = None
    gflops_max: float | None = None
    shard: list[Text] | None = Field(
        None, max_length=32, description="shard name ([dataset/]path in the input) is one of these"
    )
    caption_contains: Text | None = Field(
        None,
        description="words the caption must all hold, as the full-text index reads them (case and word forms "
        "folded); served by that index, not a scan",
    )

    @field_validator("route", "shard", "caption_contains")
    @classmethod
    def _printable(cls, value):
        for text in value if isinstance(value, list) else [value] if value is not None else []:
            if any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise ValueError("control characters are not allowed in filter values")
        return value

    @field_validator("complexity_min", "complexity_max", "gflops_max")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def where(self) -> str | None:
        """The Lance SQL filter the structured fields mean, or None when none is set (`caption_contains`
        is not one: it goes to the full-text index as `Searcher.search(caption_words=...)`)."""
        parts = []
        if self.route:
            parts.append(f"route IN ({', '.join(sql_literal(r) for r in self.route)})")
        if self.exit_depth:
            parts.append(f"exit_depth IN ({', '.join(str(int(d)) for d in self.exit_depth)})")
        if self.complexity_min is not None:
            parts.append(f"complexity >= {float(self.complexity_min)!r}")
        if self.complexity_max is not None:
            parts.append(f"complexity <= {float(self.complexity_max)!r}")
        if self.gflops_max is not None:
            parts.append(f"gflops <= {float(self.gflops_max)!r}")
        if self.shard:
            parts.append(f"shard IN ({', '.join(sql_literal(s) for s in self.shard)})")
        return " AND ".join(parts) or None
