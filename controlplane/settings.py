"""Tailguard control plane settings: one module, driven by the environment.

Every value has an embedded default so `tailguard demo` runs with nothing set up
(SQLite, a filesystem Celery broker, the in-memory channel layer). Production sets
DATABASE_URL (PostgreSQL) and REDIS_URL, which switch the broker and channel layer.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

from agent.broker import broker_transport
from agent.protocol import broker_transport_options

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TAILGUARD_DATA_DIR", BASE_DIR / "var")).resolve()


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _embedded_secret_key() -> str:
    """A per-installation key kept in DATA_DIR, so demo sessions survive restarts."""
    path = DATA_DIR / "secret_key"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = os.environ.get("SECRET_KEY") or _embedded_secret_key()
DEBUG = _env_bool("DEBUG", False)
ALLOWED_HOSTS = _env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = _env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "controlplane.core",
    "controlplane.tenancy",
    "controlplane.inventory",
    "controlplane.storage",
    "controlplane.fleet",
    "controlplane.telemetry",
    "controlplane.slo",
    "controlplane.console",
    "controlplane.alerts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
ASGI_APPLICATION = "controlplane.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{DATA_DIR / 'tailguard.sqlite3'}")
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo's processes (web, Celery, beat) share the file: WAL lets readers run
    # beside the writer, IMMEDIATE transactions queue writers instead of failing them.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Under ASGI each request's sync code may run on a new thread, so per-thread persistent
    # connections would be reopened per request; a pool shares them across threads.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": int(os.environ.get("DATABASE_POOL_SIZE", "20")),
        "timeout": 30,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True
# The console's dashboards, built by `npm run build` in frontend/ (./tailguard does it).
STATICFILES_DIRS = [("console", BASE_DIR / "frontend" / "dist")]

LOGIN_URL = "console:login"

REDIS_URL = os.environ.get("REDIS_URL", "")

# Celery: Redis in production; without it a broker that needs no server (a folder
# shared by the processes of one machine: filesystem://localhost/path).
CELERY_BROKER_URL = (
    os.environ.get("CELERY_BROKER_URL")
    or REDIS_URL
    or f"filesystem://localhost{DATA_DIR / 'broker'}"
)
CELERY_BROKER_TRANSPORT = broker_transport(CELERY_BROKER_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = broker_transport_options(CELERY_BROKER_URL)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True

CHANNEL_LAYERS = {
    "default": (
        {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
        if REDIS_URL
        else {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    )
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "controlplane.tenancy.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["controlplane.core.permissions.TenantRolePermission"],
    "DEFAULT_PAGINATION_CLASS": "controlplane.core.pagination.Pagination",
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "controlplane.core.filtersets.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["controlplane.core.parsers.StrictJSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "EXCEPTION_HANDLER": "controlplane.core.exceptions.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Tailguard API",
    "DESCRIPTION": "Tenants, inventory, deployments, storage and latency SLOs of an AI inference fleet.",
    "VERSION": "1",
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "NodeStatusEnum": "controlplane.inventory.choices.NodeStatus",
        "RevisionStatusEnum": "controlplane.fleet.choices.RevisionStatus",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "controlplane.core.schema.add_error_responses",
    ],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}, "httpx": {"level": "WARNING"}},
}

# Fleet: how agents are told apart from the dead, and how desired state is signed.
HEARTBEAT_INTERVAL_S = float(os.environ.get("HEARTBEAT_INTERVAL_S", "10"))
NODE_UNREACHABLE_AFTER_S = float(os.environ.get("NODE_UNREACHABLE_AFTER_S", "40"))
# Agents' requests a web process runs at once; the rest wait their turn (core/asgi.py).
AGENT_REQUEST_THREADS = int(os.environ.get("AGENT_REQUEST_THREADS", "4"))
if AGENT_REQUEST_THREADS < 1:
    raise ValueError(f"AGENT_REQUEST_THREADS must be at least 1, not {AGENT_REQUEST_THREADS}")
BOOTSTRAP_TOKEN_TTL_S = int(os.environ.get("BOOTSTRAP_TOKEN_TTL_S", str(24 * 3600)))
SIGNING_KEY_FILE = Path(os.environ.get("SIGNING_KEY_FILE", DATA_DIR / "signing_key.pem"))
# The broker URL agents are given; defaults to the control plane's own.
AGENT_BROKER_URL = os.environ.get("AGENT_BROKER_URL") or CELERY_BROKER_URL
# How agents (and people) reach this control plane: artifact URLs in desired state use it.
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://127.0.0.1:8000")
GATEWAY_PORT = int(os.environ["GATEWAY_PORT"]) if os.environ.get("GATEWAY_PORT") else None
"""The port every node's gateway listens on (one address for a load balancer in front of
them); unset, each agent takes a free port and reports it."""

# Prometheus: when set, /metrics wants `Authorization: Bearer <METRICS_TOKEN>`.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")

# Storage: uploaded model artifacts stream into FILE_UPLOAD_TEMP_DIR, beside where they are kept.
ARTIFACT_MAX_BYTES = int(os.environ.get("ARTIFACT_MAX_BYTES", str(256 * 2**30)))
FILE_UPLOAD_TEMP_DIR = DATA_DIR / "artifacts" / "incoming"
FILE_UPLOAD_TEMP_DIR.mkdir(parents=True, exist_ok=True)

# SLOs: evaluation runs as telemetry arrives (debounced per SLO) and every 30 s for silence;
# burn-rate and exhausted-budget alerts need this many events in their long window.
SLO_EVALUATE_DEBOUNCE_S = float(os.environ.get("SLO_EVALUATE_DEBOUNCE_S", "0.5"))
SLO_ALERT_MIN_EVENTS = int(os.environ.get("SLO_ALERT_MIN_EVENTS", "100"))
SLO_NO_DATA_AFTER_S = float(os.environ.get("SLO_NO_DATA_AFTER_S", "600"))

CELERY_BEAT_SCHEDULE = {
    "alerts-enqueue-due-messages": {
        "task": "alerts.enqueue_due_messages",
        "schedule": float(os.environ.get("ALERTS_SWEEP_INTERVAL_S", "5")),
    },
    "mark-silent-nodes-unreachable": {
        "task": "inventory.mark_silent_nodes_unreachable",
        "schedule": max(1.0, NODE_UNREACHABLE_AFTER_S / 3),
    },
    "evaluate-slos": {"task": "slo.evaluate_all", "schedule": 30.0},
    "telemetry-compact-gauges": {"task": "telemetry.compact_gauges", "schedule": 60.0},
    "telemetry-fold-shards": {"task": "telemetry.fold_shards", "schedule": 300.0},
    "telemetry-prune-rollups": {"task": "telemetry.prune_rollups", "schedule": 3600.0},
}

# Alerts: webhook delivery (Standard Webhooks signatures, retries from a database outbox).
ALERTS_DELIVERY_TIMEOUT_S = float(os.environ.get("ALERTS_DELIVERY_TIMEOUT_S", "10"))
ALERTS_MAX_ATTEMPTS = int(os.environ.get("ALERTS_MAX_ATTEMPTS", "15"))
ALERTS_BACKOFF_BASE_S = float(os.environ.get("ALERTS_BACKOFF_BASE_S", "10"))
ALERTS_BACKOFF_MAX_S = float(os.environ.get("ALERTS_BACKOFF_MAX_S", "3600"))
ALERTS_RETRY_AFTER_MAX_S = float(os.environ.get("ALERTS_RETRY_AFTER_MAX_S", str(24 * 3600)))
# Alert semantics as Prometheus and Alertmanager have them: an alert resolves only after its
# condition has been false this long (keep_firing_for). Deliveries to an endpoint are grouped
# per SLO and severity: a new group's first waits GROUP_WAIT for the rest of it (shorter than
# Alertmanager's 30 s, so a page still lands within a minute of an outage), later changes
# wait GROUP_INTERVAL, and a group still firing is told again after REPEAT_INTERVAL.
ALERTS_KEEP_FIRING_FOR_S = float(os.environ.get("ALERTS_KEEP_FIRING_FOR_S", "300"))
ALERTS_GROUP_WAIT_S = float(os.environ.get("ALERTS_GROUP_WAIT_S", "10"))
ALERTS_GROUP_INTERVAL_S = float(os.environ.get("ALERTS_GROUP_INTERVAL_S", "300"))
ALERTS_REPEAT_INTERVAL_S = float(os.environ.get("ALERTS_REPEAT_INTERVAL_S", str(4 * 3600)))
# How long a rotated-out secret keeps signing deliveries beside the new one.
ALERTS_SECRET_GRACE_S = int(os.environ.get("ALERTS_SECRET_GRACE_S", str(24 * 3600)))
