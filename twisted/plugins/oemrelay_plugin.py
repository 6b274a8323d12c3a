"""twistd plugin: ``twistd oemrelay -c relay.ini``."""

from twisted.application.service import ServiceMaker

oemrelay = ServiceMaker(
    "oemrelay",
    "oemrelay.tap",
    "Digital Matter device relay (OEM Server replacement).",
    "oemrelay",
)
