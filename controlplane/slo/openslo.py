"""OpenSLO v1 documents: an SLO written out as `kind: SLO` with an inline ratio indicator,
and read back, refusing what Tailguard cannot measure by the document path at fault.

The indicator's good and total queries use metric source `tailguard`, whose spec names
the metric, the scope (`deployment`, `model` or `tenant`, with `deployment`/`model`
naming it), `measuredAt` (`worker`, the default, or `gateway`) and, on the good query,
`thresholdSeconds`. Deployments are named, not
identified, so a document moves between tenants and installations.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from django.core.exceptions import ValidationError
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from pydantic.alias_generators import to_camel

from controlplane.slo.choices import ROLLING_DAYS, MeasuredAt, Scope, Sli, Window
from controlplane.slo.models import Slo

SOURCE_TYPE = "tailguard"
CALENDAR_DURATION = "1M"
_ROLLING = {f"{days}d": window for window, days in ROLLING_DAYS.items()}
_GOOD = "spec.indicator.spec.ratioMetric.good.metricSource.spec"
FIELD_PATHS = {
    "name": "metadata.name",
    "display_name": "metadata.displayName",
    "description": "spec.description",
    "scope": f"{_GOOD}.scope",
    "deployment": f"{_GOOD}.deployment",
    "model_name": f"{_GOOD}.model",
    "sli": f"{_GOOD}.metric",
    "threshold_seconds": f"{_GOOD}.thresholdSeconds",
    "measured_at": f"{_GOOD}.measuredAt",
    "objective": "spec.objectives[0].target",
    "window": "spec.timeWindow[0]",
}


class _Strict(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class _Open(_Strict):
    """OpenSLO metadata may carry labels and annotations Tailguard has no use for."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Metadata(_Open):
    name: str
    display_name: str = ""


class SourceSpec(_Strict):
    metric: Sli
    scope: Scope = Scope.TENANT
    deployment: str | None = None
    model: str | None = None
    measured_at: MeasuredAt = MeasuredAt.WORKER
    threshold_seconds: float | None = None


class MetricSource(_Strict):
    type: Literal["tailguard"]
    spec: SourceSpec


class Query(_Strict):
    metric_source: MetricSource


class RatioMetric(_Strict):
    counter: bool = True
    good: Query
    total: Query


class IndicatorSpec(_Strict):
    ratio_metric: RatioMetric


class Indicator(_Strict):
    metadata: Metadata | None = None
    spec: IndicatorSpec


class Calendar(_Strict):
    start_time: str | None = None
    time_zone: Literal["UTC", "Etc/UTC"] = "UTC"


class TimeWindow(_Strict):
    duration: str
    is_rolling: bool
    calendar: Calendar | None = None


class Objective(_Open):
    display_name: str = ""
    target: float


class Spec(_Strict):
    description: str = ""
    service: str = ""
    indicator: Indicator
    time_window: list[TimeWindow] = Field(min_length=1, max_length=1)
    budgeting_method: Literal["Occurrences"]
    objectives: list[Objective] = Field(min_length=1, max_length=1)


class Document(_Strict):
    api_version: Literal["openslo/v1"]
    kind: Literal["SLO"]
    metadata: Metadata
    spec: Spec


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _window(window: TimeWindow) -> str:
    if window.is_rolling and window.duration in _ROLLING:
        return _ROLLING[window.duration]
    if not window.is_rolling and window.duration == CALENDAR_DURATION:
        return Window.CALENDAR_MONTH
    raise ValidationError(
        {
            FIELD_PATHS["window"]: [
                f"Use a rolling {', '.join(_ROLLING)} window or a calendar month "
                f"(duration {CALENDAR_DURATION}, isRolling false)."
            ]
        }
    )


def parse(text: str) -> dict[str, Any]:
    """The SLO fields of one OpenSLO v1 document (the deployment still by name).

    Raises a ValidationError keyed by document path.
    """
    try:
        loaded = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ValidationError({"body": [f"Not valid YAML: {exc}"]}) from None
    if len(loaded) != 1 or not isinstance(loaded[0], dict):
        raise ValidationError({"body": ["Send exactly one OpenSLO document (a YAML mapping)."]})
    try:
        doc = Document.model_validate(loaded[0])
    except PydanticValidationError as exc:
        errors: dict[str, list[str]] = {}
        for error in exc.errors():
            errors.setdefault(_path(error["loc"]), []).append(error["msg"])
        raise ValidationError(errors) from None
    ratio = doc.spec.indicator.spec.ratio_metric
    good, total = ratio.good.metric_source.spec, ratio.total.metric_source.spec
    total_path = "spec.indicator.spec.ratioMetric.total.metricSource.spec"
    if total.threshold_seconds is not None:
        raise ValidationError(
            {f"{total_path}.thresholdSeconds": ["Only the good query has a threshold."]}
        )
    if (total.metric, total.scope, total.deployment, total.model, total.measured_at) != (
        good.metric,
        good.scope,
        good.deployment,
        good.model,
        good.measured_at,
    ):
        raise ValidationError(
            {total_path: ["The total query must count the same metric and scope as the good one."]}
        )
    return {
        "name": doc.metadata.name,
        "display_name": doc.metadata.display_name,
        "description": doc.spec.description,
        "scope": good.scope,
        "deployment": good.deployment,
        "model_name": good.model or "",
        "sli": good.metric,
        "threshold_seconds": good.threshold_seconds,
        "measured_at": good.measured_at,
        "objective": doc.spec.objectives[0].target,
        "window": _window(doc.spec.time_window[0]),
    }


def as_paths(error: ValidationError) -> ValidationError:
    """A model's field errors re-keyed by where the field sits in the document."""
    if not hasattr(error, "error_dict"):
        return error
    return ValidationError(
        {FIELD_PATHS.get(field, field): messages for field, messages in error.message_dict.items()}
    )


def dump(slo: Slo) -> str:
    """The SLO as one OpenSLO v1 YAML document."""
    source: dict[str, Any] = {"metric": slo.sli, "scope": slo.scope}
    if slo.scope == Scope.DEPLOYMENT and slo.deployment is not None:
        source["deployment"] = slo.deployment.name
    if slo.scope == Scope.MODEL:
        source["model"] = slo.model_name
    if slo.measured_at != MeasuredAt.WORKER:
        source["measuredAt"] = slo.measured_at
    good = {**source}
    if slo.threshold_seconds is not None:
        good["thresholdSeconds"] = slo.threshold_seconds
    if slo.window == Window.CALENDAR_MONTH:
        window: dict[str, Any] = {
            "duration": CALENDAR_DURATION,
            "isRolling": False,
            "calendar": {"startTime": "2020-01-01 00:00:00", "timeZone": "UTC"},
        }
    else:
        window = {"duration": f"{ROLLING_DAYS[Window(slo.window)]}d", "isRolling": True}
    service = {
        Scope.DEPLOYMENT: slo.deployment.name if slo.deployment else "",
        Scope.MODEL: slo.model_name,
        Scope.TENANT: slo.tenant.slug,
    }[Scope(slo.scope)]
    document = {
        "apiVersion": "openslo/v1",
        "kind": "SLO",
        "metadata": {"name": slo.name, "displayName": slo.display_name or slo.name},
        "spec": {
            "description": slo.description,
            "service": service,
            "indicator": {
                "metadata": {"name": f"{slo.name}-sli"},
                "spec": {
                    "ratioMetric": {
                        "counter": True,
                        "good": {"metricSource": {"type": SOURCE_TYPE, "spec": good}},
                        "total": {"metricSource": {"type": SOURCE_TYPE, "spec": source}},
                    }
                },
            },
            "timeWindow": [window],
            "budgetingMethod": "Occurrences",
            "objectives": [{"displayName": slo.display_name or slo.name, "target": slo.objective}],
        },
    }
    return yaml.safe_dump(document, sort_keys=False)
