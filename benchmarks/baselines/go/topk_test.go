package main

import (
	"sort"
	"testing"
)

func TestTopKMatchesSort(t *testing.T) {
	var r rng
	r.seed(3)
	var heap []int32
	for _, n := range []int{1, 2, 7, 50, 400, 2000} {
		scores := make([]float64, n)
		for i := range scores {
			scores[i] = float64(r.next()%97) / 97 // many ties
		}
		want := make([]int, n)
		for i := range want {
			want[i] = i
		}
		// Best first; ties keep the earlier candidate first.
		sort.SliceStable(want, func(i, j int) bool { return scores[want[i]] > scores[want[j]] })
		for _, k := range []int{1, 5, 50, n, n + 10} {
			heap = topK(scores, k, heap)
			if len(heap) != min(k, n) {
				t.Fatalf("n=%d k=%d: %d indices", n, k, len(heap))
			}
			for i, idx := range heap {
				if int(idx) != want[i] {
					t.Fatalf("n=%d k=%d: position %d is %d, want %d", n, k, i, idx, want[i])
				}
			}
		}
	}
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
