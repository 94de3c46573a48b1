#!/usr/bin/perl
# translate.pl - turn a .cu file into C++ for the CUDA emulator (emu.cpp):
#   k<<<grid, block[, smem[, stream]]>>>(args)  ->  cudaemu::launch(k, "k", grid, block, ...)(args)
#   extern __shared__ T name[];                  ->  T *name = (T *)cudaemu::dyn_smem();
# Everything else is left to the shim headers (qualifiers are macros there).
# A #line directive keeps compiler messages pointing at the .cu file.
# Usage: perl translate.pl FILE.cu > FILE.cpp
use strict;
use warnings;
my $file = shift or die "usage: translate.pl FILE.cu\n";
open(my $fh, '<', $file) or die "translate.pl: $file: $!\n";
my $src = do { local $/; <$fh> };
close $fh;
my $launches = 0;
# kernel name: an identifier, optionally qualified and with template arguments
$src =~ s{((?:::)?[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*(?:\s*<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(}
         {$launches++; "cudaemu::launch($1, \"$1\", $2)("}gse;
$src =~ s{extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;}
         {$1 *$2 = ($1 *)cudaemu::dyn_smem();}gs;
# (">>>" alone may close nested templates)
die "translate.pl: $file: a launch (<<< >>>) not translated\n" if $src =~ /<<</;
die "translate.pl: $file: extern __shared__ not translated\n" if $src =~ /extern\s+__shared__/;
print "#line 1 \"$file\"\n", $src;
