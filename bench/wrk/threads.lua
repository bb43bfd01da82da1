-- Shared by the wrk scripts here: number wrk's threads (each sees its own ``tid``) and
-- keep them in the global ``threads``, so done() can sum what each counted.
threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
