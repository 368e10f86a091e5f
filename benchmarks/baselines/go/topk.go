package main

// topK returns the indices of the k largest scores, best first, in heap (reused; its capacity is kept).
//
// It keeps a min-heap of the best k seen so far, so a score that does not beat the k-th best costs one
// comparison: O(n + k log k log n) in the usual case, O(n log k) at worst, against O(n log n) for a full
// sort. Ties keep the earlier candidate. With k >= len(scores) it is a heapsort of everything.
func topK(scores []float64, k int, heap []int32) []int32 {
	if k > len(scores) {
		k = len(scores)
	}
	heap = heap[:0]
	for i := range scores {
		if len(heap) < k {
			heap = append(heap, int32(i))
			siftUp(scores, heap, len(heap)-1)
		} else if k > 0 && scores[i] > scores[heap[0]] {
			heap[0] = int32(i)
			siftDown(scores, heap, 0, k)
		}
	}
	// Heapsort in place: move the minimum to the end, k-1 times; the slice ends up best first.
	for end := len(heap) - 1; end > 0; end-- {
		heap[0], heap[end] = heap[end], heap[0]
		siftDown(scores, heap, 0, end)
	}
	return heap
}

// less orders the min-heap: lower score first, and on equal scores the later index first, so that the
// earlier candidate is the one kept and ranked higher.
func less(scores []float64, a, b int32) bool {
	if scores[a] != scores[b] {
		return scores[a] < scores[b]
	}
	return a > b
}

func siftUp(scores []float64, heap []int32, i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !less(scores, heap[i], heap[parent]) {
			return
		}
		heap[i], heap[parent] = heap[parent], heap[i]
		i = parent
	}
}

func siftDown(scores []float64, heap []int32, i, n int) {
	for {
		child := 2*i + 1
		if child >= n {
			return
		}
		if right := child + 1; right < n && less(scores, heap[right], heap[child]) {
			child = right
		}
		if !less(scores, heap[child], heap[i]) {
			return
		}
		heap[i], heap[child] = heap[child], heap[i]
		i = child
	}
}
