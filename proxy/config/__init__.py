"""Configuration: the TOML schema, its loader and the rules across keys.

``schema`` holds the typed settings (each field with its default, doc and check), ``loader`` reads
a file into them, ``checks`` holds the rules that span several keys, ``problems`` the error type,
and ``docs`` renders the config reference from the schema. Import from here.
"""

from __future__ import annotations

from proxy.config.schema import (  # noqa: F401
    BackendSettings as BackendSettings,
    ChargerBase as ChargerBase,
    actions_problem as actions_problem,
    ChargerSettings as ChargerSettings,
    ConnectorSettings as ConnectorSettings,
    Config as Config,
    EmsSettings as EmsSettings,
    InlineSecondary as InlineSecondary,
    LogSettings as LogSettings,
    MeterRegister as MeterRegister,
    MeterSettings as MeterSettings,
    MetricsSettings as MetricsSettings,
    ModbusChargerSettings as ModbusChargerSettings,
    OfflineSettingsSection as OfflineSettingsSection,
    SecondarySettings as SecondarySettings,
    SecondaryTarget as SecondaryTarget,
    ServerSettings as ServerSettings,
    SiteSettings as SiteSettings,
    UpstreamTarget as UpstreamTarget,
    listen_address as listen_address,
    non_negative as non_negative,
    parse_listen as parse_listen,
    phase_number as phase_number,
    positive as positive,
    required as required,
    setting as setting,
    unwrap_optional as unwrap_optional,
    upstream_url as upstream_url,
    websocket_url as websocket_url,
)
from proxy.config.problems import (  # noqa: F401
    ConfigError as ConfigError,
    LineIndex as LineIndex,
    Problem as Problem,
    StartupError as StartupError,
    startup_step as startup_step,
)
from proxy.config.loader import (  # noqa: F401
    load as load,
    loads as loads,
)
from proxy.config.checks import (  # noqa: F401
    cross_checks as cross_checks,
    site_warnings as site_warnings,
    subprotocol_warnings as subprotocol_warnings,
)
from proxy.config.security import (  # noqa: F401
    security_warnings as security_warnings,
)
from proxy.config.schema import (  # noqa: F401
    charge_point_id_problem as charge_point_id_problem,
    redact_url as redact_url,
)
