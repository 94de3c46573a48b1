#!/bin/sh
# sweep-plot.sh - a small SVG line plot for sweep.sh (no dependency but awk).
#
#   sh pipelines/sweep-plot.sh ROWS XCOL YCOL XLABEL YLABEL > plot.svg
#
# ROWS: sweep.sh's rows, "method n params memory_ratio active speedup ppl acc"
# per line, the dense model's row first (method "dense").  One line per method
# through its points in increasing x, the dense model's y as a dashed line; a
# tuned method (METHOD+tune) dotted, in the colour of its method.
set -eu
[ $# -eq 5 ] || { echo "usage: sweep-plot.sh ROWS XCOL YCOL XLABEL YLABEL" >&2; exit 2; }
sort -k1,1 -k"$2","$2"g "$1" | awk -v xc="$2" -v yc="$3" -v xl="$4" -v yl="$5" '
function sx(x) { return 70 + (x - x0) / (x1 - x0) * 460 }
function sy(y) { return 330 - (y - y0) / (y1 - y0) * 290 }
function esc(s) { gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); return s }
$yc == "-" || $xc == "-" { next }
$1 == "dense" { dense = $yc; have_dense = 1; if (!n || $yc < y0) y0 = $yc; if (!n || $yc > y1) y1 = $yc; next }
{
    if (!($1 in idx)) { idx[$1] = ++nm; name[nm] = $1 }
    k = idx[$1]; np[k]++; px[k, np[k]] = $xc; py[k, np[k]] = $yc
    if (!n || $xc < x0) x0 = $xc; if (!n || $xc > x1) x1 = $xc
    if ((!n && !have_dense) || $yc < y0) y0 = $yc; if ((!n && !have_dense) || $yc > y1) y1 = $yc
    n++
}
END {
    split("#1f77b4 #d62728 #2ca02c #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf", col, " ")
    if (!n) { x0 = 0; x1 = 1 }
    if (x1 == x0) { x0 -= 0.5; x1 += 0.5 }
    if (y1 == y0) { y0 -= 0.5; y1 += 0.5 }
    pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad
    print "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"380\" font-family=\"sans-serif\" font-size=\"12\">"
    print "<rect width=\"720\" height=\"380\" fill=\"white\"/>"
    print "<rect x=\"70\" y=\"40\" width=\"460\" height=\"290\" fill=\"none\" stroke=\"black\"/>"
    for (t = 0; t <= 4; t++) {
        xv = x0 + (x1 - x0) * t / 4; yv = y0 + (y1 - y0) * t / 4
        printf "<text x=\"%.1f\" y=\"348\" text-anchor=\"middle\">%.3g</text>\n", sx(xv), xv
        printf "<text x=\"64\" y=\"%.1f\" text-anchor=\"end\">%.4g</text>\n", sy(yv) + 4, yv
        printf "<line x1=\"70\" x2=\"530\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", sy(yv), sy(yv)
    }
    printf "<text x=\"300\" y=\"372\" text-anchor=\"middle\">%s</text>\n", esc(xl)
    printf "<text x=\"16\" y=\"185\" text-anchor=\"middle\" transform=\"rotate(-90 16 185)\">%s</text>\n", esc(yl)
    if (have_dense) {
        printf "<line x1=\"70\" x2=\"530\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"black\" stroke-dasharray=\"6 4\"/>\n", sy(dense), sy(dense)
        print "<line x1=\"545\" x2=\"575\" y1=\"50\" y2=\"50\" stroke=\"black\" stroke-dasharray=\"6 4\"/><text x=\"580\" y=\"54\">dense</text>"
    }
    # a tuned method (METHOD+tune): the colour of its method, dotted, open points
    for (k = 1; k <= nm; k++) {
        base = name[k]; sub(/\+tune$/, "", base); tuned = base != name[k]
        if (!(base in colour)) colour[base] = col[nc++ % 10 + 1]
        c = colour[base]; pts = ""
        dash = tuned ? " stroke-dasharray=\"2 3\"" : ""
        fill = tuned ? "white\" stroke=\"" c : c
        for (i = 1; i <= np[k]; i++) {
            pts = pts sprintf("%.1f,%.1f ", sx(px[k, i]), sy(py[k, i]))
            printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", sx(px[k, i]), sy(py[k, i]), fill
        }
        printf "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"%s/>\n", pts, c, dash
        ly = 50 + 18 * k
        printf "<line x1=\"545\" x2=\"575\" y1=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"%s/>", ly, ly, c, dash
        printf "<text x=\"580\" y=\"%d\">%s</text>\n", ly + 4, esc(name[k])
    }
    print "</svg>"
}'
