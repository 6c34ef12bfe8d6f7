"""Remote builders (issue 8), the client side: a device hands the build of its new system to a bigger
machine over SSH, and a laptop hands a whole image build to one.

A push that changes a device's system (its packages, /debian), on the device (kiosk.device.system.fetch_bundle
through kiosk.device.fetch.fetch_from_builders):

  1. candidates: select.effective_builders(spec) (`builders` plus Nixiosk's `localSystem`), by
     speedFactor, keeping those whose systems include the board's architecture and whose host
     key the spec pins (publicHostKey): the device never talks to a builder it cannot verify;
  2. a TCP probe of every candidate at once (ssh.probe_all, KIOSK_BUILDER_CONNECT_TIMEOUT);
  3. the first reachable one gets ONE request over ssh (client.exchange: the device's own key, a
     known_hosts written from the spec, StrictHostKeyChecking=yes, BatchMode=yes); on the builder
     `kiosk builder-serve` (kiosk.buildhost) builds the system with kiosk build's pipeline and answers
     with a JSON header and the signed RAUC bundle (wire), or its casync index and a chunk store;
  4. the device streams the answer to its disk while hashing, checks every file, the whole stream and
     the bundle's signature against the certificate it trusts, and only then installs it into its
     other root slot;
  5. an unreachable or failing builder costs one log line and the next is tried; when none
     works the push fails with nothing changed, unless the board can build for itself
     (canBuildItself, kiosk.device.selfbuild).

A device made before every board had root slots asks for .debs instead (the `packages` request,
apt.fetch_packages against its dpkg status); builders still answer it.

Modules: select (which builders), ssh (reaching one), wire (the answer format, both sides),
client (one request), apt (resolution, shared by a builder and a self-building device), keys
(the device's own key, made on the device, never in the image; settings in the image), remote
(`kiosk build --builder`), commands (`kiosk builders check|key|authorize`). Design notes, trust model and figures: notes/builders.md.
"""
