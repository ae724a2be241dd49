#!/usr/bin/env bash
# Keeps a demo folder's results in the repository, so that a long study can run over several
# machines or sessions: `save` copies the small files that hold every finished run (demo.json,
# runs/*.json, continual/*.json, results, report) of a demo folder into evidence/NAME; `restore`
# copies them back, after which rerunning the same `mode demo ...` command skips every run they
# hold and goes on with the rest. Models, experts and prepared data are not kept (they are large
# and rebuilt as needed).
#
#   scripts/evidence.sh save runs/demo-full       # -> evidence/demo-full
#   scripts/evidence.sh restore runs/demo-full    # <- evidence/demo-full (refuses to overwrite
#                                                 #    a different file unless --force)
set -euo pipefail
usage() { echo "usage: $0 save|restore DEMO_DIR [--force]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd="$1" dir="${2%/}" force="${3:-}"
name="$(basename "$dir")"
store="$(cd "$(dirname "$0")/.." && pwd)/evidence/$name"

# copy SRC DEST: the kept files under SRC into DEST, same layout.
copy() {
    local src="$1" dest="$2" rel
    [ -d "$src" ] || { echo "evidence: $src: no such folder" >&2; exit 1; }
    shopt -s nullglob
    local files=()
    for rel in "$src"/*.json "$src"/report.htm[l] "$src"/runs/*.json "$src"/continual/*.json; do
        files+=("${rel#"$src"/}")
    done
    [ ${#files[@]} -gt 0 ] || { echo "evidence: $src holds no results" >&2; exit 1; }
    for rel in "${files[@]}"; do
        local f="$dest/$rel"
        if [ "$cmd" = restore ] && [ -e "$f" ] && ! cmp -s "$src/$rel" "$f" && [ "$force" != --force ]; then
            echo "evidence: $f differs from $src/$rel; pass --force to overwrite it" >&2
            exit 1
        fi
    done
    for rel in "${files[@]}"; do
        mkdir -p "$(dirname "$dest/$rel")"
        cp "$src/$rel" "$dest/$rel.tmp.$$"
        mv -f "$dest/$rel.tmp.$$" "$dest/$rel"
    done
    echo "evidence: ${#files[@]} files from $src to $dest" >&2
    # A run scored to its end drops its partial file; on save, drop the stored copy too, or a
    # later restore would bring back a stale partial beside the finished run.
    if [ "$cmd" = save ]; then
        for rel in "$dest"/runs/*.partial.json; do
            [ -e "$src/runs/$(basename "$rel")" ] || { rm -f "$rel"; echo "evidence: dropped $rel (finished)" >&2; }
        done
    fi
}

case "$cmd" in
    save) copy "$dir" "$store" ;;
    restore) copy "$store" "$dir" ;;
    *) usage ;;
esac
