# yaml-flatten.awk: flatten the block-style YAML subset that cloud-init NoCloud
# seeds use (maps, sequences, plain/quoted scalars, `|` literal blocks) into
# "path<TAB>value" lines, e.g.
#   users[0].name	alice
#   users[0].ssh_authorized_keys[0]	ssh-ed25519 AAAA... c
#   ethernets.eth0.match.macaddress	52:54:00:12:34:56
# A literal block (`key: |`) yields one line per block line, all with the same
# path. Flow collections ([a, b], {a: b}), anchors, tags and multi-document
# streams are not supported (the provider never writes them). Runs under busybox
# awk. Nothing here is evaluated by a shell: the output is data only.

function indent_of(s) { match(s, /^ */); return RLENGTH }
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }
function unquote(v,    q, out, i, c) {
	v = trim(v)
	if (v ~ /^".*"$/) {
		v = substr(v, 2, length(v) - 2)
		out = ""
		for (i = 1; i <= length(v); i++) {
			c = substr(v, i, 1)
			if (c == "\\" && i < length(v)) {
				i++; c = substr(v, i, 1)
				if (c == "n") c = " "
				else if (c == "t") c = " "
			}
			out = out c
		}
		return out
	}
	if (v ~ /^'.*'$/) {
		v = substr(v, 2, length(v) - 2)
		gsub(/''/, "'", v)
		return v
	}
	# plain scalar: drop a trailing " # comment"
	sub(/[ \t]+#.*$/, "", v)
	return v
}
function join(parent, key) { return parent == "" ? key : parent "." key }
function emit(path, value) { gsub(/\t/, " ", value); print path "\t" value }

# Stack of open containers. ind[d]: column of their children (-1 = not yet
# known: a "key:" whose value is on the next lines), kind[d]: "map" or "seq",
# keycol[d]: column of the key that opened it, cnt[d]: items so far (seq).
function push(path, col, k) { depth++; P[depth] = path; IND[depth] = -1; KEYCOL[depth] = col; KIND[depth] = k; CNT[depth] = 0 }

# Handle "key: value" / "key:" / "key: |" at column col inside container depth.
function key_line(t, col,    key, val) {
	key = t; sub(/:.*$/, "", key)
	val = t; sub(/^[^:]*:/, "", val); val = trim(val)
	if (val == "") {
		push(join(P[depth], key), col, "")
	} else if (val ~ /^[|>][-+]?$/) {
		inblock = 1; bpath = join(P[depth], key); bkeycol = col; bcol = -1
		bfold = (substr(val, 1, 1) == ">")
	} else {
		emit(join(P[depth], key), unquote(val))
	}
}

BEGIN { depth = 0; P[0] = ""; IND[0] = 0; KIND[0] = "map"; inblock = 0 }

{
	line = $0
	sub(/\r$/, "", line)
	if (inblock) {
		if (line ~ /^[ \t]*$/) { emit(bpath, ""); next }
		c = indent_of(line)
		if (c > bkeycol) {
			if (bcol < 0) bcol = c
			emit(bpath, substr(line, bcol + 1))
			next
		}
		inblock = 0
	}
	if (line ~ /^[ \t]*$/ || line ~ /^[ \t]*#/ || line ~ /^---[ \t]*$/ || line ~ /^\.\.\.[ \t]*$/) next
	col = indent_of(line)
	t = trim(line)
	isitem = (t ~ /^-( |$)/)

	# A container opened by "key:" learns its children's column from this line.
	if (depth > 0 && IND[depth] < 0) {
		if (col > KEYCOL[depth] || (col == KEYCOL[depth] && isitem)) {
			IND[depth] = col
			KIND[depth] = isitem ? "seq" : "map"
		} else {
			emit(P[depth], "")   # "key:" with no value (null)
			depth--
		}
	}
	# Close containers that this line is outside of.
	while (depth > 0 && (IND[depth] > col || (IND[depth] == col && KIND[depth] == "seq" && !isitem)))
		depth--

	if (isitem && KIND[depth] == "seq") {
		rest = t; sub(/^-[ ]*/, "", rest)
		itempath = P[depth] "[" CNT[depth] "]"
		CNT[depth]++
		rcol = col + length(t) - length(rest)
		if (rest == "") {
			push(itempath, col, "")
		} else if (rest ~ /^[A-Za-z0-9_.\/-]+:( |$)/) {
			push(itempath, col, "map")
			IND[depth] = rcol
			key_line(rest, rcol)
		} else {
			emit(itempath, unquote(rest))
		}
		next
	}
	if (t ~ /^[A-Za-z0-9_.\/-]+:( |$)/) {
		key_line(t, col)
		next
	}
	# Anything else (a continuation line of a multi-line plain scalar, or a
	# malformed line) is ignored.
}

END { if (depth > 0 && IND[depth] < 0) emit(P[depth], "") }
