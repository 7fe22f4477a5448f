#!/usr/bin/env bash
# Run here (not on the GPU machine, which has no network): downloads the Debian dev packages the device build
# needs into .device/debs, which the device tool carries (`carry: [".device/debs"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/debs && cd .device/debs
apt-get download libcurl4-openssl-dev libpcre2-dev libsqlite3-dev libutf8proc-dev libutf8proc2 \
  libcpp-httplib-dev libcpp-httplib0.11 nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev \
  libbenchmark-dev libbenchmark1debian libyaml-cpp-dev libyaml-cpp0.7
ls
