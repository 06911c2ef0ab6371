"""cometkit: a thread-pool client for CometAPI (OpenAI-compatible) built on ``requests``.

Retry strategy, admission control and metrics are supplied by pluggy plugins; see
``docs/plugins.md``. Everything a plugin may use is exported here.
"""

from . import _exceptions, plugin_api
from ._binary import BinaryAnswer
from ._checkout import map_plugins_package
from ._client import Client
from ._exceptions import *  # noqa: F403 -- the exception tree, named once in its __all__
from ._objects import ApiObject, ListObject
from ._raw_response import RawResponse
from ._streaming import Stream
from ._version import __version__
from .clock import Clock, SystemClock
from .context import ClientContext
from .hookspecs import hookimpl
from .options import Option, PluginSpec
from .plugin_api import *  # noqa: F403 -- the plugin contract, named once in its __all__

__all__ = [
    "__version__",
    "Client",
    "ApiObject",
    "ListObject",
    "RawResponse",
    "Stream",
    "BinaryAnswer",
    "hookimpl",
    "ClientContext",
    "Option",
    "PluginSpec",
    "Clock",
    "SystemClock",
]
# The exception tree and the plugin contract are listed once, in their modules' __all__
# (type checkers and IDEs follow both the star imports and these two lines).
__all__ += plugin_api.__all__
__all__ += _exceptions.__all__

# From a checkout that was never installed, ``cometkit_plugins`` is the checkout's plugins/.
map_plugins_package()
