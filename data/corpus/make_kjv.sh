#!/usr/bin/env bash
# Writes the bundled default corpus: the King James Bible (public domain, the
# translation of 1611), as shipped by Debian's bible-kjv-text package and read
# out with its `bible` program (package bible-kjv). One document per chapter,
# documents separated by a blank line, verses one per line:
#
#   Genesis 1
#   1 In the beginning God created the heaven and the earth.
#   2 And the earth was without form, ...
#
# Usage: data/corpus/make_kjv.sh OUTPUT.txt      (about 4.3 MB, 1189 documents)
set -euo pipefail
out=${1:?usage: make_kjv.sh OUTPUT.txt}
command -v bible >/dev/null || { echo "make_kjv.sh: 'bible' not found (apt-get install bible-kjv)" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# A very wide line so that no verse is wrapped; chapter headings are the
# lines that do not start with a space.
bible -l 1000000 "Genesis 1:1-Revelation 22:21" | awk '
  /^$/ { next }
  /^[^ ]/ { if (n++) printf "\n"; print; next }
  { sub(/^ +/, ""); print }
' > "$tmp"
mv "$tmp" "$out"
trap - EXIT
