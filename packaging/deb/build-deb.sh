#!/usr/bin/env bash
# Builds the esl-agent Debian package from an already built binary, with
# dpkg-deb only (no debhelper, no cargo-deb): the package is one binary, one
# unit, one config and three maintainer scripts, and this keeps CI from
# compiling a packaging tool.
#
#   packaging/deb/build-deb.sh BINARY [ARCH] [OUTDIR]
#
# BINARY  the release binary, ideally `--no-default-features` (no demo broker)
# ARCH    Debian architecture of BINARY (default: this machine's, e.g. amd64;
#         arm64 for target/aarch64-unknown-linux-gnu/...)
# OUTDIR  where the .deb goes (default: target/deb)
#
# Prints the path of the package it wrote on the last line.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${1:?usage: build-deb.sh BINARY [ARCH] [OUTDIR]}"
arch="${2:-$(dpkg --print-architecture)}"
out="${3:-$root/target/deb}"
[ -x "$bin" ] || { echo "build-deb.sh: $bin is not an executable" >&2; exit 1; }

# The workspace version, e.g. 0.1.0, becomes 0.1.0-1.
version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
[ -n "$version" ] || { echo "build-deb.sh: no version in Cargo.toml" >&2; exit 1; }
deb_version="$version-1"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
pkg="$stage/pkg"
doc="$pkg/usr/share/doc/esl-agent"

install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/lib/systemd/system" \
    "$pkg/usr/share/esl-agent" "$pkg/etc/esl-agent" "$doc"
install -m 0755 "$bin" "$pkg/usr/bin/esl-agent"
# A release binary is stripped already; a dev build (CI) is not.
case "$arch" in
    arm64) strip_tool=aarch64-linux-gnu-strip ;;
    *) strip_tool=strip ;;
esac
if command -v "$strip_tool" >/dev/null 2>&1; then
    "$strip_tool" "$pkg/usr/bin/esl-agent"
fi
install -m 0644 "$root/systemd/esl-agent.service" "$pkg/usr/lib/systemd/system/"
install -m 0644 "$root/systemd/ble.conf" "$pkg/usr/share/esl-agent/"
# 0640 root:root in the archive; postinst gives the esl-agent group read
# access (the group does not exist when dpkg unpacks).
install -m 0640 "$root/packaging/agent.toml" "$pkg/etc/esl-agent/agent.toml"
install -m 0644 "$root/docs/INSTALL.md" "$root/docs/CONFIG.md" "$doc/"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: esl-agent

Files: *
Copyright: esl-agent contributors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

echo /etc/esl-agent/agent.toml >"$pkg/DEBIAN/conffiles"
install -m 0755 "$root/packaging/deb/postinst" "$root/packaging/deb/prerm" \
    "$root/packaging/deb/postrm" "$pkg/DEBIAN/"

# Shared-library dependencies of the binary, the way debhelper finds them.
# dpkg-shlibdeps wants a source package around it.
mkdir -p "$stage/src/debian"
printf 'Source: esl-agent\n\nPackage: esl-agent\nArchitecture: any\n' >"$stage/src/debian/control"
shlibs="$(cd "$stage/src" && DEB_HOST_ARCH="$arch" dpkg-shlibdeps -O "$pkg/usr/bin/esl-agent" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')"
[ -n "$shlibs" ] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies for $bin ($arch)" >&2; exit 1; }

cat >"$pkg/DEBIAN/control" <<EOF
Package: esl-agent
Version: $deb_version
Architecture: $arch
Maintainer: esl-agent maintainers <esl-agent@example.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: $shlibs, adduser
Section: net
Priority: optional
Homepage: https://example.invalid/esl-agent
Description: edge agent for electronic shelf label access points
 Receives price-change tasks over MQTT, stores them durably before
 acknowledging them, delivers them to shelf labels through a radio backend
 and reports every task's outcome to the back end through a durable outbox.
 Runs as the systemd service esl-agent.service (Type=notify, watchdog,
 sandboxed) under its own system user.
EOF

mkdir -p "$out"
deb="$out/esl-agent_${deb_version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
