#!/usr/bin/env bash
# Installs nf4core into a scratch prefix, then builds and runs the example
# program the way a downstream user would: through pkg-config only.
set -euo pipefail
src="$1"
work="$2"
rm -rf "$work"
mkdir -p "$work"
meson setup "$work/build" "$src" --prefix="$work/prefix" --libdir=lib -Dtests=false >"$work/setup.log"
meson install -C "$work/build" >"$work/install.log"
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig"
pkg-config --exists nf4core
CXX="${CXX:-c++}"
# shellcheck disable=SC2046
"$CXX" -std=c++17 -O2 "$src/examples/quantize_example.cpp" -o "$work/example" \
    $(pkg-config --cflags --libs nf4core) -Wl,-rpath,"$work/prefix/lib"
"$work/example"
